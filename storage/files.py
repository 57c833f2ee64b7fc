"""Whole-object reads and all-or-nothing writes on any URL.

Every writer in ``storage`` goes through ``atomic_writer`` so that a reader never sees a
partial object at the target URL: on local disk we write a unique temporary file beside
the target, fsync it and rename it over (rename is atomic within a filesystem); on S3 the
object only appears when the single PUT or the multipart "complete" succeeds, and a
failed write aborts the upload. The writer also counts bytes and hashes them, so callers
get size and sha256 without reading the data back.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import uuid

from . import urls
from .errors import StorageNotFoundError, errors_naming

log = logging.getLogger(__name__)


class HashingWriter:
    """A write-only file object that forwards to ``raw`` while counting and hashing.

    ``close()`` is deliberately a no-op: libraries such as pyarrow close the sink they
    were given, but only ``atomic_writer`` may decide whether the object is committed.
    """

    def __init__(self, raw):
        self._raw = raw
        self._sha = hashlib.sha256()
        self.size = 0
        self.closed = False

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        self._raw.write(view)
        self._sha.update(view)
        self.size += len(view)
        return len(view)

    def tell(self) -> int:
        return self.size

    def flush(self) -> None:
        pass  # the raw file is flushed once, at commit

    def writable(self) -> bool:
        return True

    def readable(self) -> bool:
        return False

    def seekable(self) -> bool:
        return False

    def close(self) -> None:
        self.closed = True

    @property
    def sha256(self) -> str:
        return self._sha.hexdigest()


@contextlib.contextmanager
def atomic_writer(url: str, storage_options: dict | None = None, *, exclusive: bool = False):
    """Yield a ``HashingWriter``; the object appears at ``url`` only if the block succeeds.

    ``exclusive=True`` refuses to replace an existing object (``FileExistsError``): used
    for data files, whose unique names must never be reused.
    """
    fs, path = urls.resolve(url, storage_options)
    if urls.is_local(url):
        with errors_naming(url, "write"):
            _ensure_dir(os.path.dirname(path))
            tmp = f"{path}.tmp-{uuid.uuid4().hex}"
            try:
                with open(tmp, "wb") as raw:
                    writer = HashingWriter(raw)
                    yield writer
                    raw.flush()
                    os.fsync(raw.fileno())
                if exclusive:
                    os.link(tmp, path)  # fails with FileExistsError instead of replacing
                    os.unlink(tmp)
                else:
                    os.replace(tmp, path)
                _fsync_dir(os.path.dirname(path))
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        return
    with errors_naming(url, "write"):
        raw = fs.open(path, "xb" if exclusive else "wb")
        try:
            writer = HashingWriter(raw)
            yield writer
        except BaseException:
            _discard(raw)
            raise
        try:
            raw.close()  # single PUT or multipart complete: the commit point
        except BaseException:
            _discard(raw)
            raise
    log.debug("wrote %s (%d bytes)", url, writer.size)


def write_bytes_atomic(url: str, data: bytes, storage_options: dict | None = None,
                       *, exclusive: bool = False) -> tuple[int, str]:
    """Write ``data`` to ``url`` all-or-nothing; return ``(size, sha256)``."""
    with atomic_writer(url, storage_options, exclusive=exclusive) as f:
        f.write(data)
    return f.size, f.sha256


def read_all(url: str, storage_options: dict | None = None) -> bytes:
    """All bytes at ``url``; ``StorageNotFoundError`` (a FileNotFoundError) if absent."""
    fs, path = urls.resolve(url, storage_options)
    with errors_naming(url, "read"):
        try:
            return fs.cat_file(path)
        except FileNotFoundError as exc:
            raise StorageNotFoundError(f"not found: {url}", url) from exc
        except IsADirectoryError as exc:
            raise StorageNotFoundError(f"not found: {url} is a directory", url) from exc


def exists(url: str, storage_options: dict | None = None) -> bool:
    """Whether an object/file exists at ``url`` (raises ``StorageError`` if unreachable)."""
    fs, path = urls.resolve(url, storage_options)
    with errors_naming(url, "check"):
        if urls.is_local(url):
            return os.path.exists(path)
        fs.invalidate_cache(path)
        return fs.exists(path)


def stat(url: str, storage_options: dict | None = None) -> tuple[int, str]:
    """``(size, sha256)`` of the object at ``url``, streamed in blocks."""
    fs, path = urls.resolve(url, storage_options)
    sha = hashlib.sha256()
    size = 0
    with errors_naming(url, "read"):
        try:
            with fs.open(path, "rb") as f:
                while block := f.read(4 << 20):
                    sha.update(block)
                    size += len(block)
        except FileNotFoundError as exc:
            raise StorageNotFoundError(f"not found: {url}", url) from exc
    return size, sha.hexdigest()


def delete(url: str, storage_options: dict | None = None) -> None:
    """Remove the object at ``url`` if present."""
    fs, path = urls.resolve(url, storage_options)
    with errors_naming(url, "delete"):
        try:
            fs.rm_file(path)
        except FileNotFoundError:
            pass


def _discard(raw) -> None:
    """Abort an unfinished object-store upload so nothing appears at the URL."""
    try:
        raw.discard()
    except Exception:  # noqa: BLE001 - the original error matters more
        log.debug("could not abort upload to %s", getattr(raw, "path", "?"), exc_info=True)
    raw.closed = True  # never let __del__ / close() commit a half-written object


def _ensure_dir(path: str) -> None:
    os.makedirs(path or ".", exist_ok=True)


def _fsync_dir(path: str) -> None:
    """Make a rename durable across power loss (best effort; some filesystems refuse)."""
    try:
        fd = os.open(path or ".", os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
