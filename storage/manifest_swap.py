"""Compare-and-swap of one manifest document: the atomic step under every commit.

``store_for(root)`` returns a store with ``load() -> (bytes | None, token)`` and
``swap(data, token)``; ``swap`` writes only if the document is still at ``token``, returns
the new token (a true value) when it wrote and False when another writer got there first
(the caller re-reads and retries).
See storage/manifest.py for how commits use it.

The swap is:

- S3: ``PutObject`` with ``IfMatch=<etag>`` (or ``IfNoneMatch='*'`` for the first
  commit), which AWS S3, SeaweedFS, MinIO and moto refuse with ``PreconditionFailed``
  when someone else committed in between. One PUT: readers see old or new, never half.
- Local disk: an exclusive ``flock`` on ``<root>/.manifest.lock`` around "compare the
  current bytes with the token, write a temporary file, rename it over". The kernel
  drops the lock if the holder dies, so a killed writer never wedges the dataset; the
  rename makes the switch atomic for readers (who take no lock). The lock file stays.
"""
from __future__ import annotations

import hashlib
import os

from . import files, urls
from .errors import StorageError, errors_naming, is_precondition_failed

MANIFEST_NAME = "manifest.json"
LOCK_NAME = ".manifest.lock"


def manifest_url(root: str) -> str:
    return urls.join(root, MANIFEST_NAME)


def store_for(root: str, storage_options: dict | None, name: str = MANIFEST_NAME, lock: str = LOCK_NAME):
    """The compare-and-swap store of the document ``<root>/<name>`` (the manifest unless named;
    storage/lease.py keeps its lease document the same way); ``lock`` is the local flock file."""
    proto = urls.protocol(root)
    if urls.is_local(root):
        return _LocalStore(root, name, lock)
    if proto in ("s3", "s3a"):
        return _S3Store(root, storage_options, name)
    raise StorageError(f"{name} documents on {proto}:// are not supported (no compare-and-swap); "
                       f"use a local path or s3:// for {root}", root)


class _LocalStore:
    """Compare-and-swap on local disk: flock + compare bytes + write temp + rename."""

    def __init__(self, root: str, name: str = MANIFEST_NAME, lock: str = LOCK_NAME):
        self.url = urls.join(root, name)
        self.dir = urls.local_path(root)
        self.path = os.path.join(self.dir, name)
        self.lock = lock

    def load(self) -> tuple[bytes | None, str | None]:
        with errors_naming(self.url, "read"):
            try:
                with open(self.path, "rb") as f:
                    data = f.read()
            except FileNotFoundError:
                return None, None
        return data, _digest(data)

    def swap(self, data: bytes, token: str | None) -> str | bool:
        import fcntl  # POSIX only, like the rest of the stack

        with errors_naming(self.url, "commit"):
            os.makedirs(self.dir, exist_ok=True)
            fd = os.open(os.path.join(self.dir, self.lock), os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                current, current_token = self.load()
                if current_token != token:
                    return False
                files.write_bytes_atomic(self.path, data)
                return _digest(data)
            finally:
                os.close(fd)  # releases the flock


class _S3Store:
    """Compare-and-swap on S3: GET returns the ETag; PUT with IfMatch / IfNoneMatch."""

    def __init__(self, root: str, storage_options: dict | None, name: str = MANIFEST_NAME):
        self.url = urls.join(root, name)
        self.fs, path = urls.resolve(self.url, storage_options)
        self.bucket, self.key, _ = self.fs.split_path(path)

    def load(self) -> tuple[bytes | None, str | None]:
        from fsspec.asyn import sync

        async def get():
            resp = await self.fs._call_s3("get_object", Bucket=self.bucket, Key=self.key)
            try:
                return await resp["Body"].read(), resp["ETag"]
            finally:
                resp["Body"].close()

        with errors_naming(self.url, "read"):
            try:
                return sync(self.fs.loop, get)
            except FileNotFoundError:
                return None, None

    def swap(self, data: bytes, token: str | None) -> str | bool:
        condition = {"IfMatch": token} if token is not None else {"IfNoneMatch": "*"}
        with errors_naming(self.url, "commit"):
            try:
                resp = self.fs.call_s3("put_object", Bucket=self.bucket, Key=self.key, Body=data,
                                       ContentType="application/json", **condition)
            except Exception as exc:  # noqa: BLE001 - only a lost race is swallowed
                if is_precondition_failed(exc):
                    return False
                raise
            finally:
                self.fs.invalidate_cache(f"{self.bucket}/{self.key}")
        return resp.get("ETag") or True


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
