"""The face dataset format written by ``opqn prepare``: its schema, version, only writer and readers.

``<dataset>/faces/part-*.parquet``: one row per face (``FACE_SCHEMA``): face_id string (the
photo's sha256, 24 hex, and the face's index in the photo), identity string (nullable), source
string (the photo's URL), split string, image binary (the encoded aligned crop, PNG or JPEG, one
size for the whole dataset), box list<float32>[4] and landmarks list<float32>[10] in the photo's
own pixels, det_score float32 (landmarks and det_score are null in a dataset prepared with
``aligned``: photos that already were face crops, taken without detection).
``<dataset>/rejects/part-*.parquet``: one row per photo that gave no face (``REJECT_SCHEMA``):
source, reason (a short code), detail, identity.
``<dataset>/sources/part-*.parquet``: one row per input photo (``SOURCE_SCHEMA``): source,
identity, content_hash, split, faces, reason; the record of what was processed, which
incremental runs read to skip known photos and keep duplicate and split decisions stable.
``<dataset>/manifest.json`` (storage.manifest) lists every file; one ingest shard's three
files are listed by one commit. Its metadata ``ingest`` holds ``{"format": KIND, "version":
VERSION, "config": <the settings that shaped the rows>}``, so a later run can refuse to mix
crops of different settings.

A dataset without a manifest (faces/*.parquet assembled by hand) is read by file name.

Decoding a stored crop (``decode_face``) takes the centre ``crop_fraction`` of it and resizes
it to the caller's ``stored_size``: the size the model was trained at, decided by the
checkpoint (pipelines.formats.checkpoint), not by the dataset.
"""
from __future__ import annotations

import io
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import torch
from PIL import Image

from storage import files, lease, urls
from storage import manifest as mf
from storage import tables

KIND = "opqn-faces"
VERSION = 1
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
SCHEMAS = {FACES_DIR: FACE_SCHEMA, REJECTS_DIR: REJECT_SCHEMA, SOURCES_DIR: SOURCE_SCHEMA}


# --------------------------------------------------------------------------- faces in memory

@dataclass
class FaceSet:
    """Decoded faces held in memory: what ``load_face_dataset`` returns (and photo folders load into)."""

    images: torch.Tensor  # (N, 3, S, S) uint8
    labels: np.ndarray  # (N,) identity strings
    paths: list[str]  # face ids, or photo paths for a photo folder

    def subset(self, index) -> "FaceSet":
        index = np.asarray(index, dtype=np.int64)
        return FaceSet(self.images[torch.from_numpy(index)], self.labels[index], [self.paths[i] for i in index])

    def __len__(self) -> int:
        return len(self.paths)


def face_array(im: Image.Image, stored_size: int, crop_fraction: float) -> np.ndarray:
    """Centre square crop of ``crop_fraction`` of the shorter side, resized, as (3, S, S) uint8."""
    im = im.convert("RGB")
    w, h = im.size
    side = max(1, int(round(min(w, h) * crop_fraction)))
    left, top = (w - side) // 2, (h - side) // 2
    im = im.crop((left, top, left + side, top + side)).resize((stored_size, stored_size), Image.BILINEAR)
    return np.asarray(im, dtype=np.uint8).transpose(2, 0, 1).copy()


def decode_face(data: bytes, stored_size: int, crop_fraction: float = 1.0) -> np.ndarray:
    """An encoded face crop (a face row's ``image`` cell) as (3, S, S) uint8."""
    with Image.open(io.BytesIO(data)) as im:
        return face_array(im, stored_size, crop_fraction)


def decode_batch(images, stored_size: int, crop_fraction: float = 1.0, threads: int = 1) -> np.ndarray:
    """Encoded crops -> (n, 3, S, S) uint8; a face that fails to decode is an error naming its index.

    ``threads`` > 1 decodes in a thread pool (PIL releases the GIL while decoding)."""
    out = np.empty((len(images), 3, stored_size, stored_size), dtype=np.uint8)

    def decode(i: int) -> None:
        try:
            out[i] = decode_face(bytes(images[i]), stored_size, crop_fraction)
        except Exception as exc:
            raise ValueError(f"face image {i} of the batch cannot be decoded: {exc}") from exc

    if threads > 1 and len(images) > 1:
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(decode, range(len(images))))
    else:
        for i in range(len(images)):
            decode(i)
    return out


# --------------------------------------------------------------------------- read

def face_shards(dataset: str, storage_options: dict | None = None) -> list[tuple[str, str, str]]:
    """(url, key, fingerprint) of every face shard: key is the path relative to the dataset,
    fingerprint its sha256 when a manifest lists it (else its size), so a later run can tell
    new or rewritten shards from ones it has already processed."""
    fs, root = urls.resolve(dataset, storage_options)
    listed = mf.read_manifest(dataset, storage_options)
    if listed is not None:
        found = [(urls.join(dataset, f.path), f.path, f.sha256) for f in listed.files
                 if f.path.startswith(FACES_DIR + "/")]
    else:
        if not fs.exists(root):
            raise FileNotFoundError(f"face dataset not found: {dataset}")
        found = []
        for path in sorted(fs.glob(f"{root.rstrip('/')}/{FACES_DIR}/*.parquet")):
            key = f"{FACES_DIR}/" + path.rsplit("/", 1)[-1]
            found.append((urls.join(dataset, key), key, f"size:{fs.size(path)}"))
    if not found:
        raise ValueError(f"face dataset {dataset} has no face shards (expected {dataset.rstrip('/')}/faces/*.parquet)")
    return found


def face_shard_files(dataset: str, storage_options: dict | None = None) -> list[str]:
    """URLs of the dataset's face shards (manifest order, or sorted without a manifest)."""
    return [url for url, _, _ in face_shards(dataset, storage_options)]


def is_face_dataset(url: str, storage_options: dict | None = None) -> bool:
    try:
        return bool(face_shard_files(url, storage_options))
    except (ValueError, FileNotFoundError):
        return False


def arrow_filesystem(url: str, storage_options: dict | None = None) -> tuple[pafs.FileSystem, str]:
    """A pyarrow filesystem for any storage URL (S3 endpoint and keys as the storage layer sets them)."""
    fs, path = urls.resolve(url, storage_options)
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path


def read_face_columns(shards: list[str], columns=("face_id", "identity", "split"),
                      storage_options: dict | None = None) -> pa.Table:
    """Columns of the given face shards, concatenated; without ``image`` this is the cheap read
    of labels, splits and ids."""
    parts = []
    for url in shards:
        fs, path = arrow_filesystem(url, storage_options)
        parts.append(pq.read_table(path, columns=list(columns), filesystem=fs))
    return pa.concat_tables(parts) if parts else pa.table({c: [] for c in columns})


def load_face_dataset(dataset: str, splits, stored_size: int, crop_fraction: float = 1.0,
                      storage_options: dict | None = None, allow_empty: bool = False,
                      select=None, threads: int = 1, files: list[str] | None = None) -> FaceSet:
    """Faces of the given splits decoded into memory.

    ``select(face_ids) -> bool mask`` keeps a subset before decoding: a Ray Train worker holds
    only its own share of the dataset. ``files`` skips listing the dataset again.
    """
    images, labels, ids = [], [], []
    for url in files or face_shard_files(dataset, storage_options):
        fs, path = arrow_filesystem(url, storage_options)
        table = pq.read_table(path, columns=["face_id", "identity", "split", "image"], filesystem=fs)
        keep = np.isin(np.asarray(table.column("split").to_pylist(), dtype=object), list(splits))
        if select is not None:
            keep &= select(np.asarray(table.column("face_id").to_pylist(), dtype=object))
        if not keep.any():
            continue
        table = table.filter(pa.array(keep))
        try:
            images.append(decode_batch(table.column("image").to_pylist(), stored_size, crop_fraction, threads))
        except ValueError as exc:
            raise ValueError(f"{url}: {exc}") from exc
        labels += table.column("identity").to_pylist()
        ids += table.column("face_id").to_pylist()
    if not ids:
        if allow_empty:
            return FaceSet(torch.zeros((0, 3, stored_size, stored_size), dtype=torch.uint8), np.asarray([]), [])
        raise ValueError(f"dataset {dataset} has no faces in splits {list(splits)}")
    return FaceSet(torch.from_numpy(np.concatenate(images)), np.asarray(labels), ids)


def _read_listed(dataset: str, folder: str, columns: list[str] | None, storage_options: dict | None) -> pa.Table:
    """One table (faces, rejects or sources) as the manifest lists it: unlisted files are not data."""
    schema = SCHEMAS[folder]
    if columns:
        schema = pa.schema([schema.field(c) for c in columns])
    manifest = mf.read_manifest(dataset, storage_options)
    listed = [mf.file_url(dataset, e) for e in manifest.files if e.path.startswith(folder + "/")] if manifest else []
    parts = [tables.read_table(u, columns, storage_options) for u in listed]
    return pa.concat_tables(parts) if parts else schema.empty_table()


def read_faces(dataset: str, columns: list[str] | None = None, storage_options: dict | None = None) -> pa.Table:
    return _read_listed(dataset, FACES_DIR, columns, storage_options)


def read_rejects(dataset: str, storage_options: dict | None = None) -> pa.Table:
    return _read_listed(dataset, REJECTS_DIR, None, storage_options)


def read_sources(dataset: str, storage_options: dict | None = None) -> pa.Table:
    return _read_listed(dataset, SOURCES_DIR, None, storage_options)


def recorded_settings(manifest: mf.Manifest | None) -> dict | None:
    """The settings the dataset's rows were made with (``None`` for a dataset never committed)."""
    return (manifest.metadata.get("ingest") or {}).get("config") if manifest else None


# --------------------------------------------------------------------------- write

def write_shard(dataset: str, faces: list[dict], rejects: list[dict], sources: list[dict],
                storage_options: dict | None = None) -> list[mf.FileEntry]:
    """Write one shard's rows as new, unlisted files; return the entries for ``commit_shard``.

    The sources file is written even when empty of faces: it is the record that the shard's
    photos were processed."""
    entries = []
    for folder, rows in ((FACES_DIR, faces), (REJECTS_DIR, rejects), (SOURCES_DIR, sources)):
        if rows or folder == SOURCES_DIR:
            schema = SCHEMAS[folder]
            entries.append(mf.write_data_file(dataset, pa.Table.from_pylist(rows, schema), subdir=folder,
                                              schema=schema, storage_options=storage_options))
    return entries


class _AlreadyListed(Exception):
    """Raised inside a commit: some of the shard's photos were listed by another writer meanwhile."""

    def __init__(self, sources: set[str]):
        super().__init__(f"{len(sources)} photo(s) already listed")
        self.sources = sources


class _SourcesSeen:
    """Photo URLs and face-bearing content hashes of the sources files a dataset lists, grown one
    new file at a time: listed files never change, so a run reads each once however many commits
    it makes or re-applies (and a commit costs its new files, not the whole dataset)."""

    def __init__(self):
        self.paths: set[str] = set()
        self.urls: set[str] = set()
        self.hashes: set[str] = set()


_SEEN: dict[str, _SourcesSeen] = {}
_SEEN_LOCK = threading.Lock()  # commits of one process may run in threads


def _listed_sources(dataset: str, manifest: mf.Manifest, storage_options: dict | None) -> _SourcesSeen:
    """What the sources files ``manifest`` lists record (``_SourcesSeen``)."""
    with _SEEN_LOCK:
        return _grow_seen(dataset, manifest, storage_options)


def _grow_seen(dataset: str, manifest: mf.Manifest, storage_options: dict | None) -> _SourcesSeen:
    listed = {e.path: e for e in manifest.files if e.path.startswith(SOURCES_DIR + "/")}
    seen = _SEEN.get(dataset)
    if seen is None or not seen.paths <= listed.keys():  # a file was unlisted: start over
        seen = _SEEN[dataset] = _SourcesSeen()

    def read(entry: mf.FileEntry) -> pa.Table:
        return tables.read_table(mf.file_url(dataset, entry), ["source", "content_hash", "faces"], storage_options)

    new = [e for path, e in listed.items() if path not in seen.paths]
    with ThreadPoolExecutor(min(8, max(1, len(new)))) as pool:  # parallel GETs on an object store
        for entry, t in zip(new, pool.map(read, new)):
            seen.urls.update(t.column("source").to_pylist())
            seen.hashes.update(h for h, n in zip(t.column("content_hash").to_pylist(), t.column("faces").to_pylist())
                               if h and n)
            seen.paths.add(entry.path)
    return seen


def _without_sources(dataset: str, entries: list[mf.FileEntry], dropped: set[str],
                     storage_options: dict | None) -> list[mf.FileEntry]:
    """Rewrite a written shard's files without the rows of the ``dropped`` photos (unlisted files)."""
    rows = {}
    for folder in SCHEMAS:
        parts = [tables.read_table(mf.file_url(dataset, e), None, storage_options)
                 for e in entries if e.path.startswith(folder + "/")]
        kept = [r for t in parts for r in t.to_pylist() if r["source"] not in dropped]
        rows[folder] = kept
    for e in entries:
        files.delete(mf.file_url(dataset, e), storage_options)  # never listed: nobody reads them
    if not rows[SOURCES_DIR]:
        return []
    return write_shard(dataset, rows[FACES_DIR], rows[REJECTS_DIR], rows[SOURCES_DIR], storage_options)


def commit_shard(dataset: str, entries: list[mf.FileEntry], settings: dict,
                 storage_options: dict | None = None) -> mf.Manifest | None:
    """List one or more written shards' files in the manifest (all in one commit), recording the settings.

    Idempotent per photo: the commit re-checks, on the manifest it lands on, which photos are
    already recorded (by URL, or by the content of a photo that gave faces: the same face ids)
    and never lists them twice. A shard whose photos another writer committed meanwhile is
    rewritten without them (outside the compare-and-swap) and committed again; one left empty
    commits nothing and returns ``None``."""
    metadata = {"ingest": {"format": KIND, "version": VERSION, "config": settings}}
    for _ in range(10):
        mine = {}  # photo URL -> content hash (None: no faces), of this shard
        for e in entries:
            if e.path.startswith(SOURCES_DIR + "/"):
                t = tables.read_table(mf.file_url(dataset, e), ["source", "content_hash", "faces"], storage_options)
                for u, h, n in zip(*(t.column(c).to_pylist() for c in ("source", "content_hash", "faces"))):
                    mine[u] = h if n else None

        def change(current: mf.Manifest) -> mf.Manifest:
            seen = _listed_sources(dataset, current, storage_options)
            dup = {u for u, h in mine.items() if u in seen.urls or (h is not None and h in seen.hashes)}
            if dup:
                raise _AlreadyListed(dup)
            return mf.Delta(add=tuple(entries), metadata=metadata).apply(current)

        try:
            return mf.commit(dataset, change, storage_options)
        except _AlreadyListed as exc:
            entries = _without_sources(dataset, entries, exc.sources, storage_options)
            if not entries:
                return None
    raise RuntimeError(f"dataset {dataset}: a shard kept overlapping concurrent commits; run prepare again")


def delete_uncommitted(dataset: str, storage_options: dict | None = None) -> list[str]:
    """Delete the data files a crashed run wrote but never committed; returns their paths.

    Only the holder of the dataset's writer lease may sweep, and only files older than its
    lease (storage.lease.sweepable_orphans): a newer unlisted file belongs to a running writer."""
    gone = [rel for rel in lease.sweepable_orphans(dataset, storage_options) if rel.split("/")[0] in SCHEMAS]
    for rel in gone:
        files.delete(mf.file_url(dataset, rel), storage_options)
    return gone


def write_face_file(dataset: str, name: str, rows: list[dict], storage_options: dict | None = None) -> str:
    """A face shard at ``faces/<name>``, listed by no manifest: a dataset assembled by hand
    (tests, imports from other tools), which readers list by file name. Returns its URL."""
    url = urls.join(dataset, FACES_DIR, name)
    tables.write_table(url, pa.Table.from_pylist(rows, FACE_SCHEMA), FACE_SCHEMA, storage_options)
    return url
