"""Manifests: the one document that says which data files make up a dataset or gallery.

Layout: ``<root>/manifest.json`` plus data files under ``<root>`` with unique names.
Writers write data files first (``write_data_file``), then ``commit`` a change to the
manifest; readers only trust what the manifest lists. So a crash leaves at most some
unlisted files (see ``orphans``), never a half dataset.

Manifest JSON (version 1; generation +1 on every commit; files in commit order, one a line)::

    {
     "format": "opqn-manifest", "version": 1, "generation": 3,
     "files": [
      {"path": "codes/part-20261124T050102-0f3a...parquet", "rows": 1000, "size": 123456, "sha256": "<64 hex>"}
     ],
     "metadata": {"model_id": "...", "D": 64}     # free JSON object (model id, D, M, K, ...), one key a line
    }

Concurrency: ``commit`` is an optimistic compare-and-swap loop over one document
(storage/manifest_swap.py: conditional PUT on S3, flock + rename on local disk); a writer
that loses the race re-reads the manifest and re-applies its change.

``read_manifest`` returns ``None`` when no manifest exists (a dataset that was never
committed), and an empty-but-committed manifest otherwise; ``commit`` starts from an
empty manifest in that case.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import functools
import json
import logging
import random
import re
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping

import pyarrow as pa

from . import files, urls
from .errors import (
    CommitConflictError, IntegrityError, ManifestError,
    StorageNotFoundError, UnsafePathError, errors_naming,
)
from .manifest_swap import MANIFEST_NAME, manifest_url, store_for
from .tables import DEFAULT_BATCH_SIZE, TableLike, iter_batches, write_table

log = logging.getLogger(__name__)

# Called as hook(root, manifest) after every successful commit, in the committing process.
# Tests append a hook to kill the process between commits (crash injection).
COMMIT_HOOKS: list[Callable[[str, "Manifest"], None]] = []

FORMAT = "opqn-manifest"
VERSION = 1

_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_SCHEME_OR_DRIVE = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*:")


# --------------------------------------------------------------------------- model

@dataclasses.dataclass(frozen=True)
class FileEntry:
    """One data file: its path relative to the root, row count, byte size and sha256."""

    path: str
    rows: int
    size: int
    sha256: str

    def to_dict(self) -> dict:
        return {"path": self.path, "rows": self.rows, "size": self.size, "sha256": self.sha256}


@dataclasses.dataclass(frozen=True)
class Manifest:
    """An immutable manifest. ``generation`` is 0 for "never committed"."""

    files: tuple[FileEntry, ...] = ()
    metadata: Mapping = dataclasses.field(default_factory=dict)
    generation: int = 0

    @property
    def paths(self) -> list[str]:
        return [f.path for f in self.files]

    @property
    def rows(self) -> int:
        return sum(f.rows for f in self.files)

    def file(self, path: str) -> FileEntry | None:
        return next((f for f in self.files if f.path == path), None)

    def to_dict(self) -> dict:
        return {"format": FORMAT, "version": VERSION, "generation": self.generation,
                "files": [f.to_dict() for f in self.files], "metadata": dict(self.metadata)}

    def to_json(self) -> bytes:
        """One file (and metadata key) a line, each line by json's C encoder (faster than ``indent``)."""
        dump = functools.partial(json.dumps, ensure_ascii=False)
        listed = ",".join(f"\n  {dump(f.to_dict())}" for f in self.files) + ("\n " if self.files else "")
        meta = ",".join(f"\n  {dump(str(k))}: {dump(v)}" for k, v in self.metadata.items()) + ("\n " if self.metadata else "")
        return (f'{{\n "format": {dump(FORMAT)}, "version": {VERSION}, "generation": {self.generation},\n'
                f' "files": [{listed}],\n "metadata": {{{meta}}}\n}}\n').encode()


@dataclasses.dataclass(frozen=True)
class Delta:
    """A change to re-apply on whatever manifest is current when the commit lands.

    - ``add``: entries to list. Adding a path already listed with the same entry is a
      no-op (so a retried commit does not duplicate); with a different entry, an error.
    - ``remove``: paths to unlist (absent paths are ignored, again for retries). The
      data files themselves are left in place: readers of the old manifest may still
      need them.
    - ``metadata``: keys to set (shallow update); ``drop_metadata``: keys to delete.
    """

    add: tuple[FileEntry, ...] = ()
    remove: tuple[str, ...] = ()
    metadata: Mapping = dataclasses.field(default_factory=dict)
    drop_metadata: tuple[str, ...] = ()

    def apply(self, manifest: Manifest) -> Manifest:
        removed = set(self.remove)
        kept = [f for f in manifest.files if f.path not in removed]
        listed = {f.path: f for f in kept}
        for entry in self.add:
            old = listed.get(entry.path)
            if old is None:
                kept.append(entry)
                listed[entry.path] = entry
            elif old != entry:
                raise ManifestError(f"cannot add {entry.path}: already listed with different size/checksum",
                                    path=entry.path)
        dropped = set(self.drop_metadata)
        metadata = {k: v for k, v in manifest.metadata.items() if k not in dropped}
        metadata.update(self.metadata)
        return dataclasses.replace(manifest, files=tuple(kept), metadata=metadata)


Change = Delta | Callable[[Manifest], Manifest]


# --------------------------------------------------------------------------- paths

def check_relative_path(path, manifest: str | None = None) -> str:
    """Return ``path`` if it stays under the root; raise ``UnsafePathError`` otherwise.

    Refused: empty, absolute, ``~``, backslashes, NUL, URL schemes or drive letters
    (which could point at another bucket or host), and ``.``/``..``/empty segments.
    """
    where = f"manifest {manifest}: " if manifest else ""
    reason = None
    if not isinstance(path, str) or not path:
        reason = "must be a non-empty string"
    elif _SCHEME_OR_DRIVE.match(path):
        reason = "is a URL or drive path, not relative to the root"
    elif path.startswith(("/", "~")):
        reason = "is absolute"
    elif "\\" in path or "\0" in path:
        reason = "contains a backslash or NUL"
    elif any(part in ("", ".", "..") for part in path.split("/")):
        reason = "has '..', '.' or empty segments"
    if reason:
        raise UnsafePathError(f"{where}path {path!r} escapes the root: {reason}",
                              manifest=manifest, path=str(path))
    return path


def file_url(root: str, entry: FileEntry | str) -> str:
    """The URL of a listed file (its path is validated first)."""
    path = entry.path if isinstance(entry, FileEntry) else entry
    return urls.join(root, check_relative_path(path, manifest_url(root)))


def unique_name(prefix: str = "part", suffix: str = ".parquet") -> str:
    """A file name no other writer will pick: UTC time (sortable) + 64 random bits."""
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%S")
    return f"{prefix}-{stamp}-{uuid.uuid4().hex[:16]}{suffix}"


# --------------------------------------------------------------------------- parse

def parse_manifest(data: bytes, url: str = "<manifest>") -> Manifest:
    """Validate and parse manifest bytes; ``ManifestError`` naming ``url`` otherwise."""
    try:
        doc = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ManifestError(f"manifest {url} is not valid JSON: {exc}", manifest=url) from exc
    if not isinstance(doc, dict):
        raise ManifestError(f"manifest {url}: expected a JSON object, got {type(doc).__name__}",
                            manifest=url)
    if doc.get("format", FORMAT) != FORMAT:
        raise ManifestError(f"manifest {url}: format {doc.get('format')!r} is not {FORMAT!r}",
                            manifest=url)
    version = doc.get("version")
    if not isinstance(version, int) or version < 1 or version > VERSION:
        raise ManifestError(f"manifest {url}: unsupported version {version!r} (this code reads "
                            f"up to {VERSION})", manifest=url)
    generation = doc.get("generation", 0)
    raw_files = doc.get("files")
    metadata = doc.get("metadata", {})
    if not isinstance(generation, int) or generation < 0:
        raise ManifestError(f"manifest {url}: 'generation' must be a non-negative integer",
                            manifest=url)
    if not isinstance(raw_files, list):
        raise ManifestError(f"manifest {url}: 'files' must be a list", manifest=url)
    if not isinstance(metadata, dict):
        raise ManifestError(f"manifest {url}: 'metadata' must be an object", manifest=url)
    entries, seen = [], set()
    for i, item in enumerate(raw_files):
        entry = _parse_entry(item, i, url)
        if entry.path in seen:
            raise ManifestError(f"manifest {url}: file {entry.path!r} is listed twice",
                                manifest=url, path=entry.path)
        seen.add(entry.path)
        entries.append(entry)
    return Manifest(files=tuple(entries), metadata=metadata, generation=generation)


def _parse_entry(item, index: int, url: str) -> FileEntry:
    if not isinstance(item, dict):
        raise ManifestError(f"manifest {url}: files[{index}] is not an object", manifest=url)
    path = check_relative_path(item.get("path"), url)
    rows, size, sha = item.get("rows"), item.get("size"), item.get("sha256")
    for name, value in (("rows", rows), ("size", size)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ManifestError(f"manifest {url}: file {path!r} has invalid {name} {value!r}",
                                manifest=url, path=path)
    if not isinstance(sha, str) or not _HEX64.match(sha):
        raise ManifestError(f"manifest {url}: file {path!r} has invalid sha256 {sha!r}",
                            manifest=url, path=path)
    return FileEntry(path=path, rows=rows, size=size, sha256=sha)


# --------------------------------------------------------------------------- read

def read_manifest(root: str, storage_options: dict | None = None) -> Manifest | None:
    """The committed manifest under ``root``, or ``None`` if none was ever committed.

    Raises ``ManifestError`` (malformed JSON, bad entries, paths escaping the root) and
    ``StorageError`` (unreachable store, refused credentials).
    """
    data, _token = store_for(root, storage_options).load()
    if data is None:
        return None
    return parse_manifest(data, manifest_url(root))


def verify(root: str, storage_options: dict | None = None, *, checksums: bool = True) -> Manifest:
    """Check that every listed file exists with the listed size (and sha256).

    Returns the manifest when all is well; raises ``IntegrityError`` naming every bad
    file (``.path`` is the first) otherwise, and ``StorageNotFoundError`` when there is
    no manifest. Streams each file once; ``checksums=False`` only compares sizes.
    """
    murl = manifest_url(root)
    manifest = read_manifest(root, storage_options)
    if manifest is None:
        raise StorageNotFoundError(f"no manifest at {murl}", murl)
    problems: list[tuple[str, str]] = []
    for entry in manifest.files:
        url = file_url(root, entry)
        try:
            if checksums:
                size, sha = files.stat(url, storage_options)
            else:
                size, sha = _size(url, storage_options), entry.sha256
        except StorageNotFoundError:
            problems.append((entry.path, f"{url} is listed but missing"))
            continue
        if size != entry.size:
            problems.append((entry.path, f"{url} has {size} bytes, manifest says {entry.size}"))
        elif sha != entry.sha256:
            problems.append((entry.path, f"{url} has sha256 {sha}, manifest says {entry.sha256}"))
    if problems:
        raise IntegrityError(f"manifest {murl}: " + "; ".join(p for _, p in problems),
                             manifest=murl, path=problems[0][0])
    return manifest


def iter_manifest_batches(root: str, columns: list[str] | None = None,
                          batch_size: int = DEFAULT_BATCH_SIZE,
                          storage_options: dict | None = None) -> Iterator[pa.RecordBatch]:
    """Stream the rows of every listed Parquet file, in manifest order."""
    manifest = read_manifest(root, storage_options)
    if manifest is None:
        raise StorageNotFoundError(f"no manifest at {manifest_url(root)}", manifest_url(root))
    for entry in manifest.files:
        yield from iter_batches(file_url(root, entry), columns, batch_size, storage_options)


def orphans(root: str, storage_options: dict | None = None) -> list[str]:
    """Files under ``root`` that the manifest does not list, as relative paths.

    These are left by crashed or failed writers (whole data files, ``*.tmp-*`` files on
    local disk) or unlisted by ``Delta.remove``. Only reports: deleting them is unsafe
    while another writer may be about to commit the files it just wrote.
    """
    fs, base = urls.resolve(root, storage_options)
    manifest = read_manifest(root, storage_options) or Manifest()
    listed = set(manifest.paths)
    with errors_naming(root, "list"):
        if not urls.is_local(root):
            fs.invalidate_cache(base)
        found = fs.find(base) if fs.exists(base) else []
    prefix = base.rstrip("/") + "/"
    out = []
    for name in found:
        rel = name[len(prefix):] if name.startswith(prefix) else name
        if rel.startswith(".") or rel == MANIFEST_NAME or rel in listed:  # lock, lease: not data
            continue
        out.append(rel)
    return sorted(out)


# --------------------------------------------------------------------------- write

def write_data_file(root: str, table_or_batches: TableLike, *, subdir: str = "",
                    prefix: str = "part", schema: pa.Schema | None = None,
                    storage_options: dict | None = None, **parquet_kwargs) -> FileEntry:
    """Write a Parquet data file under a fresh unique name; return its manifest entry.

    The file is not listed anywhere until you ``commit`` a ``Delta(add=[entry])``.
    """
    rel = "/".join(p for p in (subdir.strip("/"), unique_name(prefix, ".parquet")) if p)
    check_relative_path(rel)
    written = write_table(urls.join(root, rel), table_or_batches, schema, storage_options,
                          exclusive=True, **parquet_kwargs)
    return FileEntry(path=rel, rows=written.rows, size=written.size, sha256=written.sha256)


def commit(root: str, change: Change, storage_options: dict | None = None, *,
           max_attempts: int = 30, check_added: bool = True) -> Manifest:
    """Atomically apply ``change`` to the manifest under ``root``; return what was committed.

    ``change`` is a ``Delta`` or a pure function ``Manifest -> Manifest``; it is re-applied
    to the fresh manifest each time a concurrent commit wins the race, so it must not
    have side effects. A malformed current manifest raises ``ManifestError`` and is left
    untouched. ``check_added`` first checks that each added file exists with its size.
    """
    murl = manifest_url(root)
    if check_added and isinstance(change, Delta):
        _check_added(root, change.add, storage_options)
    store = store_for(root, storage_options)
    for attempt in range(max_attempts):
        data, token = store.load()
        current = parse_manifest(data, murl) if data is not None else Manifest()
        new = change.apply(current) if isinstance(change, Delta) else change(current)
        if not isinstance(new, Manifest):
            raise TypeError(f"commit to {murl}: change returned {type(new).__name__}, not Manifest")
        new, payload = _validated(dataclasses.replace(new, generation=current.generation + 1), murl)
        if store.swap(payload, token):
            log.info("committed %s generation %d (%d files)", murl, new.generation, len(new.files))
            for hook in COMMIT_HOOKS:
                hook(root, new)
            return new
        delay = min(0.02 * 2 ** attempt, 1.0) * random.uniform(0.5, 1.5)
        log.debug("commit to %s lost a race (attempt %d); retrying in %.2fs", murl, attempt + 1, delay)
        time.sleep(delay)
    raise CommitConflictError(
        f"commit to {murl} lost the compare-and-swap race {max_attempts} times; giving up", murl)


def _validated(manifest: Manifest, murl: str) -> tuple[Manifest, bytes]:
    """Refuse to write a manifest we would refuse to read; (it as read back, its bytes)."""
    try:
        data = manifest.to_json()
    except (TypeError, ValueError) as exc:
        raise ManifestError(f"commit to {murl}: metadata is not JSON-serialisable: {exc}",
                            manifest=murl) from exc
    return parse_manifest(data, murl), data


def _check_added(root: str, entries: Iterable[FileEntry], storage_options: dict | None) -> None:
    murl = manifest_url(root)
    for entry in entries:
        url = file_url(root, entry)
        try:
            size = _size(url, storage_options)
        except StorageNotFoundError:
            raise IntegrityError(f"commit to {murl}: {url} does not exist; write data files "
                                 "before committing them", manifest=murl, path=entry.path) from None
        if size != entry.size:
            raise IntegrityError(f"commit to {murl}: {url} has {size} bytes, entry says "
                                 f"{entry.size}", manifest=murl, path=entry.path)


def _size(url: str, storage_options: dict | None) -> int:
    fs, path = urls.resolve(url, storage_options)
    with errors_naming(url, "stat"):
        try:
            if not urls.is_local(url):
                fs.invalidate_cache(path)
            return int(fs.info(path)["size"])
        except FileNotFoundError as exc:
            raise StorageNotFoundError(f"not found: {url}", url) from exc
