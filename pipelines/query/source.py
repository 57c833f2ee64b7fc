"""Query faces read block by block: a face-shard dataset (rows of one split) or an identity folder.

A query set can be larger than memory (a photo collection matched against a gallery), so it
is never decoded at once. ``open_queries`` makes one cheap pass that counts the queries
(face datasets: the ``face_id`` and ``split`` columns only; folders: the file listing) and
``QuerySource.blocks(start, size)`` then decodes ``size`` queries at a time.

Positions: every query candidate has a position, its index in the input order (face shards
in manifest order, rows in file order; folders sorted by identity, then photo). A block is a
range of positions; an unreadable folder image keeps its position but yields no query, so
block boundaries, and with them the resume point of a results dataset, do not depend on
what could be decoded. ``hasher(n)`` fingerprints the ids of positions [0, n): a resumed job
checks that the queries it already answered are still the first n of the input.
"""
from __future__ import annotations

import hashlib
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from PIL import UnidentifiedImageError

from pipelines.formats.faces import decode_batch, face_shard_files, is_face_dataset, read_face_columns
from pipelines.photo_folder import IMAGE_EXTENSIONS, list_identity_folder, load_face
from storage import urls
from storage.tables import iter_batches

log = logging.getLogger(__name__)

READ_BATCH = 1024  # face rows read at once while filling a block (encoded crops only)


@dataclass(frozen=True)
class QueryBlock:
    """Positions [start, end) of the input: the query ids that decoded and their images."""

    start: int
    end: int
    ids: list[str]
    images: torch.Tensor  # (n, 3, S, S) uint8, n = len(ids) <= end - start
    position_ids: list[str] | None = None  # ids of every position (None: the same as ids)

    @property
    def all_ids(self) -> list[str]:
        return self.ids if self.position_ids is None else self.position_ids


def add_ids(hasher, ids) -> None:
    for qid in ids:
        hasher.update(qid.encode() + b"\n")


class QuerySource:
    """Base: ``count`` positions, ``blocks`` from a position, ``hasher`` of a prefix."""

    url: str
    count: int
    size: int

    def ids(self):
        """Query ids of every position, in order (a stream: never held at once)."""
        raise NotImplementedError

    def blocks(self, start: int, block: int):
        raise NotImplementedError

    def hasher(self, n: int):
        """A sha256 fed the ids of positions [0, n) (``add_ids`` feeds the next ones)."""
        h = hashlib.sha256()
        if n:
            for i, qid in enumerate(self.ids()):
                add_ids(h, [qid])
                if i + 1 == n:
                    break
        return h

    def empty_images(self) -> torch.Tensor:
        return torch.empty(0, 3, self.size, self.size, dtype=torch.uint8)


class FaceDatasetQueries(QuerySource):
    """Rows of one split (every split: ``split=""``) of a face-shard dataset; the id is the face id."""

    def __init__(self, url: str, split: str, size: int, storage_options: dict | None = None):
        self.url, self.split, self.size, self.storage_options = url, split, size, storage_options
        self.files = face_shard_files(url, storage_options)
        self.counts = []
        present: set = set()
        for f in self.files:
            col = read_face_columns([f], ("split",), storage_options).column("split")
            present |= set(col.unique().to_pylist())
            self.counts.append(int(self._keep(col).sum()))
        self.present = sorted(s for s in present if s is not None)
        self.count = sum(self.counts)

    def _keep(self, split_column) -> np.ndarray:
        values = np.asarray(split_column.to_pylist(), dtype=object)
        return values != None if not self.split else values == self.split  # noqa: E711 - elementwise

    def ids(self):
        for f, n in zip(self.files, self.counts):
            if n:
                table = read_face_columns([f], ("face_id", "split"), self.storage_options)
                yield from table.column("face_id").filter(pa.array(self._keep(table.column("split")))).to_pylist()

    def blocks(self, start: int, block: int):
        pos, ids, images = 0, [], []
        first = start
        for f, n in zip(self.files, self.counts):
            if pos + n <= start or not n:  # wholly answered already (or no queries): not read at all
                pos += n
                continue
            for batch in iter_batches(f, ["face_id", "split", "image"], READ_BATCH, self.storage_options):
                rows = pa.Table.from_batches([batch]).filter(pa.array(self._keep(batch.column("split"))))
                if pos + rows.num_rows <= start:
                    pos += rows.num_rows
                    continue
                skip = max(0, start - pos)
                rows, pos = rows.slice(skip), pos + skip
                while rows.num_rows:
                    take = min(rows.num_rows, block - len(ids))
                    part = rows.slice(0, take)
                    try:
                        images.append(decode_batch(part.column("image").to_pylist(), self.size))
                    except ValueError as exc:
                        raise ValueError(f"{f}: {exc}") from exc
                    ids += part.column("face_id").to_pylist()
                    rows, pos = rows.slice(take), pos + take
                    if len(ids) == block:
                        yield QueryBlock(first, pos, ids, torch.from_numpy(np.concatenate(images)))
                        first, ids, images = pos, [], []
        if ids:
            yield QueryBlock(first, pos, ids, torch.from_numpy(np.concatenate(images)))


class FolderQueries(QuerySource):
    """A local identity/photo folder of face crops (centre crop ``crop_fraction``); the id is the
    photo's path relative to the folder. Unreadable photos are skipped with a warning."""

    def __init__(self, url: str, size: int, crop_fraction: float = 1.0, threads: int = 2):
        if not 0 < crop_fraction <= 1:
            raise ValueError(f"crop_fraction must be in (0, 1], got {crop_fraction}")
        self.url, self.size, self.crop_fraction, self.threads = url, size, crop_fraction, threads
        root = Path(urls.local_path(url))
        if root.is_dir() and not any(p.suffix.lower() in IMAGE_EXTENSIONS for p in root.glob("*/*")):
            self.paths = []
        else:
            self.paths = [p for _, p in list_identity_folder(root, min_photos=1)]
        self.root = root
        self.count = len(self.paths)

    def ids(self):
        return (Path(p).relative_to(self.root).as_posix() for p in self.paths)

    def _load(self, path: str):
        try:
            return load_face(path, self.size, self.crop_fraction)
        except (OSError, UnidentifiedImageError, ValueError) as exc:
            log.warning("skipping unreadable image %s: %s", path, exc)
            return None

    def blocks(self, start: int, block: int):
        for b0 in range(start, self.count, block):
            paths = self.paths[b0:b0 + block]
            with ThreadPoolExecutor(max(1, self.threads)) as pool:
                arrays = list(pool.map(self._load, paths))
            keep = [i for i, a in enumerate(arrays) if a is not None]
            images = torch.from_numpy(np.stack([arrays[i] for i in keep])) if keep else self.empty_images()
            every = [Path(p).relative_to(self.root).as_posix() for p in paths]
            yield QueryBlock(b0, b0 + len(paths), [every[i] for i in keep], images, every)


def open_queries(queries_url: str, split: str, size: int, crop_fraction: float = 1.0,
                 storage_options: dict | None = None) -> QuerySource:
    """The query source at ``queries_url`` (counted, nothing decoded); warns when it holds no query."""
    if is_face_dataset(queries_url, storage_options):
        source = FaceDatasetQueries(queries_url, split, size, storage_options)
        if not source.count:
            log.warning("no queries: face dataset %s has no faces with split %r (splits present: %s)",
                        queries_url, split, source.present)
        return source
    if not urls.is_local(queries_url):
        raise FileNotFoundError(f"{queries_url} is not a face dataset (no faces/*.parquet); image-folder queries "
                                f"must be a local identity/photo tree")
    source = FolderQueries(queries_url, size, crop_fraction)
    if not source.count:
        log.warning("no queries: image folder %s holds no identity/photo images", queries_url)
    return source


def load_queries(queries_url: str, split: str, size: int, crop_fraction: float = 1.0,
                 storage_options: dict | None = None) -> tuple[list[str], torch.Tensor]:
    """(query ids, uint8 images (n, 3, size, size)) of the whole query set at once: small sets only."""
    source = open_queries(queries_url, split, size, crop_fraction, storage_options)
    blocks = list(source.blocks(0, max(1, source.count)))
    if not blocks:
        return [], source.empty_images()
    return blocks[0].ids, blocks[0].images
