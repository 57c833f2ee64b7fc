"""One shard: read its photos, detect + align them in batches, write three Parquet files.

The shard is the unit of work handed to Ray and the unit of resume: its files get fresh
unique names and become part of the dataset only when the driver commits them to the
manifest (all three in one commit). A worker killed half-way leaves unlisted files, which
the next run deletes and redoes.

Files (each listed in ``<dataset>/manifest.json``):

- ``faces/part-*.parquet``: the face rows (contract columns, see ``FACE_SCHEMA``);
- ``rejects/part-*.parquet``: ``source, reason`` (+ ``detail``, ``identity``);
- ``sources/part-*.parquet``: one row per input photo (``source, identity, content_hash,
  split, faces, reason``): the record of what was processed, used by incremental re-runs.
"""
from __future__ import annotations

from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pyarrow as pa

from storage import manifest as mf

from .config import IngestConfig
from .decode import UNREADABLE, Rejected
from .photos import Photo, process_photos
from .sources import read_source

FACES_DIR, REJECTS_DIR, SOURCES_DIR = "faces", "rejects", "sources"

FACE_SCHEMA = pa.schema([
    ("face_id", pa.string()),
    ("identity", pa.string()),
    ("source", pa.string()),
    ("split", pa.string()),
    ("image", pa.binary()),
    ("box", pa.list_(pa.float32(), 4)),
    ("landmarks", pa.list_(pa.float32(), 10)),  # x0, y0, x1, y1, ... : eyes, nose, mouth corners
    ("det_score", pa.float32()),
])
REJECT_SCHEMA = pa.schema([
    ("source", pa.string()),
    ("reason", pa.string()),
    ("detail", pa.string()),
    ("identity", pa.string()),
])
SOURCE_SCHEMA = pa.schema([
    ("source", pa.string()),
    ("identity", pa.string()),
    ("content_hash", pa.string()),
    ("split", pa.string()),
    ("faces", pa.int32()),
    ("reason", pa.string()),
])


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
    """Process one shard's photos and write its files; return the entries to commit and counts.

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
    entries = []
    opts = config.storage_options or None
    if faces:
        entries.append(mf.write_data_file(dataset, pa.Table.from_pylist(faces, FACE_SCHEMA), subdir=FACES_DIR,
                                          schema=FACE_SCHEMA, storage_options=opts))
    if rejects:
        entries.append(mf.write_data_file(dataset, pa.Table.from_pylist(rejects, REJECT_SCHEMA), subdir=REJECTS_DIR,
                                          schema=REJECT_SCHEMA, storage_options=opts))
    entries.append(mf.write_data_file(dataset, pa.Table.from_pylist(index, SOURCE_SCHEMA), subdir=SOURCES_DIR,
                                      schema=SOURCE_SCHEMA, storage_options=opts))
    return {
        "entries": [e.to_dict() for e in entries],
        "photos": len(items),
        "faces": len(faces),
        "rejected": dict(Counter(r["reason"] for r in rejects)),
    }
