"""Reading face datasets (the ingest stage's Parquet face shards) for training and encoding.

A face dataset is ``<dataset>/faces/part-*.parquet`` with the contract columns of
docs/architecture (face_id, identity, source, split, image, box, landmarks, det_score),
listed by ``<dataset>/manifest.json`` when the dataset has one.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipelines.image_folder import decode_face
from storage import urls
from storage.manifest import read_manifest

FACE_COLUMNS = ("face_id", "identity", "source", "split", "image", "box", "landmarks", "det_score")


def face_shards(dataset: str, storage_options: dict | None = None) -> list[tuple[str, str, str]]:
    """(url, key, fingerprint) of every face shard: key is the path relative to the dataset,
    fingerprint its sha256 when a manifest lists it (else its size), so a later run can tell
    new or rewritten shards from ones it has already processed."""
    fs, root = urls.resolve(dataset, storage_options)
    listed = read_manifest(dataset, storage_options)
    if listed is not None:
        found = [(urls.join(dataset, f.path), f.path, f.sha256) for f in listed.files if f.path.startswith("faces/")]
    else:
        if not fs.exists(root):
            raise FileNotFoundError(f"face dataset not found: {dataset}")
        found = []
        for path in sorted(fs.glob(f"{root.rstrip('/')}/faces/*.parquet")):
            key = "faces/" + path.rsplit("/", 1)[-1]
            found.append((urls.join(dataset, key), key, f"size:{fs.size(path)}"))
    if not found:
        raise ValueError(f"face dataset {dataset} has no face shards (expected {dataset.rstrip('/')}/faces/*.parquet)")
    return found


def face_shard_files(dataset: str, storage_options: dict | None = None) -> list[str]:
    """URLs of the dataset's face shards (manifest order, or sorted without a manifest)."""
    return [url for url, _, _ in face_shards(dataset, storage_options)]


def arrow_filesystem(url: str, storage_options: dict | None = None) -> tuple[pafs.FileSystem, str]:
    """A pyarrow filesystem for any storage URL (S3 endpoint and keys as the storage layer sets them)."""
    fs, path = urls.resolve(url, storage_options)
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path


def read_face_columns(files: list[str], columns=("face_id", "identity", "split"),
                      storage_options: dict | None = None) -> pa.Table:
    """The small columns of every shard (no image bytes): labels, splits, ids."""
    tables = []
    for url in files:
        fs, path = arrow_filesystem(url, storage_options)
        tables.append(pq.read_table(path, columns=list(columns), filesystem=fs))
    return pa.concat_tables(tables) if tables else pa.table({c: [] for c in columns})


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


def load_face_dataset(dataset: str, splits, stored_size: int, crop_fraction: float = 1.0,
                      storage_options: dict | None = None, allow_empty: bool = False,
                      select=None, threads: int = 1, files: list[str] | None = None):
    """Faces of the given splits decoded into memory (a FaceSet).

    ``select(face_ids) -> bool mask`` keeps a subset before decoding: a Ray Train worker holds
    only its own share of the dataset. ``files`` skips listing the dataset again.
    """
    import torch

    from pipelines.image_folder import FaceSet

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


def is_face_dataset(url: str, storage_options: dict | None = None) -> bool:
    try:
        return bool(face_shard_files(url, storage_options))
    except (ValueError, FileNotFoundError):
        return False
