"""One photo in -> face rows or one reject. Plain Python: no Ray, no storage.

A row carries the aligned crop (encoded), the box and landmarks in the original photo's
pixel coordinates (for photos that already are aligned crops, ``--aligned``: the photo's centre
square, no landmarks and no score), and ``face_id = <sha256 of the photo bytes, 24 hex>-<face index>``: stable
across re-runs and renames, unique as long as duplicate photos are rejected (they are, by the
driver, before any photo reaches this module).
"""
from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass

import numpy as np
from PIL import Image

from pipelines.formats import faces as face_format

from . import retry
from .align import warp_face
from .config import IngestConfig
from .decode import NO_FACE, Decoded, Rejected, decode
from .mtcnn import Detections


@dataclass
class Photo:
    """A photo to process: where it came from, its label and split, and its bytes (or why not)."""

    source: str
    identity: str | None
    split: str | None
    data: bytes | None = None
    reason: str | None = None  # decided before reading (unreadable, duplicate, too_few_photos)
    detail: str = ""
    content_hash: str | None = None  # known from the hashing pass when the bytes are not carried


def content_hash(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def face_id(photo_hash: str, index: int) -> str:
    return f"{photo_hash[:24]}-{index}"


def select_faces(det: Detections, width: int, height: int, config: IngestConfig) -> list[int]:
    """Indices of the faces to keep, best first.

    ``largest``: biggest box (identity photos: the subject is the big face, bystanders are
    small). ``central``: box area minus a penalty for distance from the centre (the subject of
    a crowded portrait). ``score``: the most confident detection. ``keep_all`` keeps every
    face over ``min_score``, in the same order.
    """
    ok = np.where(det.scores >= config.min_score)[0]
    if len(ok) == 0:
        return []
    boxes = det.boxes[ok]
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    if config.select == "largest":
        key = area
    elif config.select == "central":
        centres = np.stack([(boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2], 1)
        offset = ((centres - np.array([width / 2, height / 2])) ** 2).sum(1)
        key = area - 2.0 * offset
    else:
        key = det.scores[ok]
    order = ok[np.argsort(-key, kind="stable")]
    return [int(i) for i in (order if config.keep_all else order[:1])]


def encode(image, config: IngestConfig) -> bytes:
    buf = io.BytesIO()
    if config.image_format == "png":
        image.save(buf, format="PNG", optimize=False, compress_level=6)
    else:
        image.save(buf, format="JPEG", quality=config.jpeg_quality)
    return buf.getvalue()


def face_rows(photo: Photo, photo_hash: str, decoded: Decoded, found: retry.Found, config: IngestConfig) -> list[dict]:
    """Face rows for one decoded photo and its detections; raises ``Rejected(no_face)`` if none."""
    det = found.detections
    width, height = decoded.detect.shape[1], decoded.detect.shape[0]
    keep = select_faces(det, width, height, config)
    if not keep:
        best = f" (best score {det.scores.max():.2f} < {config.min_score})" if len(det) else ""
        raise Rejected(NO_FACE, f"no face found{best}")
    rows = []
    for index, i in enumerate(keep):
        box = det.boxes[i] * decoded.scale
        points = det.landmarks[i] * decoded.scale
        crop = warp_face(decoded.image, points, config.size, found.fill)
        rows.append({
            "face_id": face_id(photo_hash, index),
            "identity": photo.identity,
            "source": photo.source,
            "split": photo.split,
            "image": encode(crop, config),
            "box": box.astype(np.float32).tolist(),
            "landmarks": points.astype(np.float32).reshape(-1).tolist(),
            "det_score": float(det.scores[i]),
        })
    return rows


def aligned_rows(photo: Photo, photo_hash: str, decoded: Decoded, config: IngestConfig) -> list[dict]:
    """The one face row of a photo that already is an aligned face crop (``config.aligned``):
    its centre square, resized to the crop size; no detection, so no landmarks or score."""
    w, h = decoded.image.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    crop = Image.fromarray(face_format.face_array(decoded.image, config.size, 1.0).transpose(1, 2, 0))
    return [{
        "face_id": face_id(photo_hash, 0),
        "identity": photo.identity,
        "source": photo.source,
        "split": photo.split,
        "image": encode(crop, config),
        "box": [float(left), float(top), float(left + side), float(top + side)],
        "landmarks": None,
        "det_score": None,
    }]


def process_photos(photos: list[Photo], detector, config: IngestConfig) -> tuple[list[dict], list[dict], list[dict]]:
    """Faces, rejects and one index row per photo, for a batch of photos of any sizes.

    Decoding happens per photo; detection runs once for the whole batch (the detector groups
    equal sizes), then once per retry (``retry.LOOKS``) for the photos still without a face.
    With ``config.aligned`` there is no detection: each photo is its own face crop. Every photo
    ends in exactly one of faces (>= 1 rows) or rejects (1 row).
    """
    faces: list[dict] = []
    rejects: list[dict] = []
    index: list[dict] = []
    ready: list[tuple[Photo, str, Decoded]] = []

    def reject(photo: Photo, photo_hash: str | None, reason: str, detail: str) -> None:
        rejects.append({"source": photo.source, "reason": reason, "detail": detail, "identity": photo.identity})
        index.append({"source": photo.source, "identity": photo.identity, "content_hash": photo_hash,
                      "split": None, "faces": 0, "reason": reason})

    for photo in photos:
        photo_hash = content_hash(photo.data) if photo.data is not None else photo.content_hash
        if photo.reason:
            reject(photo, photo_hash, photo.reason, photo.detail)
            continue
        try:
            decoded = decode(photo.data or b"", max_side=config.detect_max_side, max_pixels=config.max_pixels)
        except Rejected as exc:
            reject(photo, photo_hash, exc.reason, exc.detail)
            continue
        ready.append((photo, photo_hash, decoded))
    if config.aligned:
        found = [None] * len(ready)
    else:
        found = retry.detect(detector, [d.detect for _, _, d in ready], lambda det, img: bool(
            select_faces(det, img.shape[1], img.shape[0], config)), config.detect_max_side)
    for (photo, photo_hash, decoded), det in zip(ready, found):
        try:
            rows = (aligned_rows(photo, photo_hash, decoded, config) if config.aligned
                    else face_rows(photo, photo_hash, decoded, det, config))
        except Rejected as exc:
            reject(photo, photo_hash, exc.reason, exc.detail)
            continue
        faces.extend(rows)
        index.append({"source": photo.source, "identity": photo.identity, "content_hash": photo_hash,
                      "split": photo.split, "faces": len(rows), "reason": None})
    return faces, rejects, index
