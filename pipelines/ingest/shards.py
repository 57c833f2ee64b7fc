"""One shard: read its photos, detect + align them in batches, write its files.

The shard is the unit of work handed to the execution layer and the unit of resume: its
files (faces, rejects, sources: pipelines.formats.faces) get fresh unique names and become
part of the dataset only when the driver commits them to the manifest, all three in one
commit. A worker killed half-way leaves unlisted files, which the next run deletes and redoes.
"""
from __future__ import annotations

from collections import Counter
from concurrent.futures import ThreadPoolExecutor

from pipelines.execution import node_id, process_cached
from pipelines.formats import faces as face_format

from .config import IngestConfig
from .decode import UNREADABLE, Rejected
from .photos import Photo, process_photos
from .sources import read_source


def read_photos(items: list[dict], config: IngestConfig, threads: int = 8) -> list[Photo]:
    """Photos with their bytes, read concurrently (object stores reward parallel GETs)."""

    def one(item: dict) -> Photo:
        photo = Photo(source=item["source"], identity=item.get("identity"), split=item.get("split"),
                      reason=item.get("reason"), detail=item.get("detail") or "",
                      content_hash=item.get("content_hash"))
        if photo.reason:
            return photo
        try:
            photo.data = read_source(photo.source, config.max_bytes, config.storage_options)
        except Rejected as exc:
            photo.reason, photo.detail = exc.reason, exc.detail
        except (OSError, ValueError) as exc:
            photo.reason, photo.detail = UNREADABLE, f"{type(exc).__name__}: {exc}"
        return photo

    if len(items) <= 1:
        return [one(i) for i in items]
    with ThreadPoolExecutor(min(threads, len(items))) as pool:
        return list(pool.map(one, items))


def process_shard(items: list[dict], dataset: str, config: IngestConfig, detector) -> dict:
    """Process one shard's photos and write its files; return their manifest entries and counts.

    ``items``: dicts with ``source, identity, split`` and, for photos the driver already
    rejected, ``reason, detail, content_hash``. Nothing is committed here.
    """
    faces: list[dict] = []
    rejects: list[dict] = []
    index: list[dict] = []
    for start in range(0, len(items), config.batch_size):
        photos = read_photos(items[start:start + config.batch_size], config)
        f, r, i = process_photos(photos, detector, config)
        faces += f
        rejects += r
        index += i
        for p in photos:
            p.data = None  # free the bytes before the next batch
    entries = face_format.write_shard(dataset, faces, rejects, index, config.storage_options or None)
    return {
        "entries": entries,
        "photos": len(items),
        "faces": len(faces),
        "rejected": dict(Counter(r["reason"] for r in rejects)),
    }


def detector(config: IngestConfig):
    """The MTCNN of this worker process, built once and kept between tasks and runs (none for
    ``aligned`` photos, which are not detected)."""
    if config.aligned:
        return None
    from .mtcnn import MTCNN

    key = ("mtcnn", config.min_face_size, tuple(config.thresholds))
    return process_cached(key, lambda: MTCNN(min_face_size=config.min_face_size, thresholds=config.thresholds))


def shard_task(items: list[dict], dataset: str, config: IngestConfig, torch_threads: int) -> dict:
    """One task of the execution layer: ``process_shard`` with the process's detector, plus the
    node it ran on. ``torch_threads`` > 0 pins the worker's torch threads (0: leave them, as
    in-process runs do)."""
    if torch_threads:
        import torch

        torch.set_num_threads(torch_threads)
    return {**process_shard(items, dataset, config, detector(config)), "node": node_id()}
