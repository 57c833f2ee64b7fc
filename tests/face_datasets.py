"""Small face datasets in the face dataset format, made from LFW photos for tests.

The ingest stage (MTCNN) is tested on its own; stages after it only need face shards, so
these are written through the format's writer without detection: the centre of each LFW
photo as the aligned crop, in shards listed by no manifest (read by file name).
"""
from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

from PIL import Image

from pipelines.formats.faces import write_face_file


def lfw_people(lfw_dir: Path, identities: int, photos: int, min_photos: int = 10,
               skip: int = 0) -> list[tuple[str, list[Path]]]:
    people = [p for p in sorted(os.listdir(lfw_dir)) if len(os.listdir(lfw_dir / p)) >= max(min_photos, photos)]
    return [(p, sorted((lfw_dir / p).iterdir())[:photos]) for p in people[skip:skip + identities]]


def face_row(identity: str, path: Path, split: str, size: int) -> dict:
    data = path.read_bytes()
    with Image.open(io.BytesIO(data)) as im:
        w, h = im.size
        side = min(w, h) // 2
        crop = im.convert("RGB").crop(((w - side) // 2, (h - side) // 2, (w + side) // 2, (h + side) // 2))
        buf = io.BytesIO()
        crop.resize((size, size)).save(buf, format="PNG")
    return {"face_id": hashlib.sha256(data).hexdigest()[:20] + "-0", "identity": identity, "source": str(path),
            "split": split, "image": buf.getvalue(), "box": [0.0, 0.0, float(w), float(h)],
            "landmarks": [0.0] * 10, "det_score": 1.0}


def write_face_dataset(root: Path, lfw_dir: Path, identities: int = 8, photos: int = 6, size: int = 40,
                       shards: int = 2, queries_per_identity: int = 1, skip: int = 0) -> Path:
    """``identities`` LFW people (after skipping ``skip``) x ``photos``, in ``shards`` face shards."""
    rows = []
    for ident, paths in lfw_people(lfw_dir, identities, photos, skip=skip):
        for i, path in enumerate(paths):
            rows.append(face_row(ident, path, "query" if i < queries_per_identity else "database", size))
    for s in range(shards):
        write_face_file(str(root), f"part-{s:05d}.parquet", rows[s::shards])
    return root
