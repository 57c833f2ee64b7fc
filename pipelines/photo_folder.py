"""A photo folder (``identity/photo.jpg``, the LFW / VGGFace2 layout) read into memory as a FaceSet.

The single-process trainer, evaluation, image-folder queries and the benchmarks read small
sets straight from a folder; the production path reads face shards written by ingest
(pipelines.formats.faces). Photos are decoded once, centre-cropped to the face region and
held as uint8 at ``stored_size`` so augmentation is a cheap slice.
"""
from __future__ import annotations

import hashlib
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from pipelines.formats.faces import FaceSet, face_array

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".pgm", ".ppm", ".bmp", ".webp", ".tif", ".tiff"}


def list_identity_folder(root: str | os.PathLike, min_photos: int = 1, max_photos: int | None = None) -> list[tuple[str, str]]:
    """(identity, path) pairs, sorted, for identities with min_photos..max_photos images."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {root}")
    items: list[tuple[str, str]] = []
    for ident in sorted(p for p in root.iterdir() if p.is_dir()):
        photos = sorted(str(p) for p in ident.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
        if len(photos) >= min_photos and (max_photos is None or len(photos) <= max_photos):
            items.extend((ident.name, p) for p in photos)
    if not items:
        raise ValueError(
            f"no images found in {root} (expected identity/photo files with extensions "
            f"{sorted(IMAGE_EXTENSIONS)}, identities with {min_photos}..{max_photos or 'any'} photos)"
        )
    return items


def load_face(path: str, stored_size: int, crop_fraction: float) -> np.ndarray:
    with Image.open(path) as im:
        return face_array(im, stored_size, crop_fraction)


def load_face_set(items: list[tuple[str, str]], stored_size: int, crop_fraction: float = 0.5,
                  threads: int = 2) -> FaceSet:
    """Decode every listed photo; unreadable files are skipped with a warning naming each."""
    if not 0 < crop_fraction <= 1:
        raise ValueError(f"crop_fraction must be in (0, 1], got {crop_fraction}")

    def load(item):
        try:
            return load_face(item[1], stored_size, crop_fraction)
        except (OSError, UnidentifiedImageError, ValueError) as exc:
            log.warning("skipping unreadable image %s: %s", item[1], exc)
            return None

    with ThreadPoolExecutor(max(1, threads)) as pool:
        arrays = list(pool.map(load, items))
    keep = [i for i, a in enumerate(arrays) if a is not None]
    skipped = len(items) - len(keep)
    if skipped:
        log.warning("skipped %d unreadable image(s) of %d", skipped, len(items))
    if not keep:
        raise ValueError(f"none of the {len(items)} listed images could be read")
    images = torch.from_numpy(np.stack([arrays[i] for i in keep]))
    return FaceSet(images, np.array([items[i][0] for i in keep]), [items[i][1] for i in keep])


def _rank_key(path: str, seed: int) -> str:
    return hashlib.sha1(f"{seed}:{os.path.basename(path)}".encode()).hexdigest()


def query_split(labels: np.ndarray, paths: list[str], fraction: float = 0.2, seed: int = 0) -> np.ndarray:
    """Boolean mask of queries: round(fraction * n) photos of each identity (at least one,
    never all), chosen by a seeded hash of the file name so the split is stable across runs."""
    if not 0 < fraction < 1:
        raise ValueError(f"query fraction must be in (0, 1), got {fraction}")
    is_query = np.zeros(len(labels), dtype=bool)
    for ident in np.unique(labels):
        idx = np.flatnonzero(labels == ident)
        if len(idx) < 2:
            continue
        n_query = min(len(idx) - 1, max(1, int(round(fraction * len(idx)))))
        order = sorted(idx, key=lambda i: _rank_key(paths[i], seed))
        is_query[order[:n_query]] = True
    return is_query
