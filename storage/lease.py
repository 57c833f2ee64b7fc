"""One writer per dataset or gallery: a lease document beside the manifest.

Manifest commits are atomic, but two jobs writing one dataset at once still do harm: each
plans from the same watermark and processes the same photos or source shards, and one job's
orphan sweep deletes files the other wrote and is about to commit. So every job that writes
a dataset or gallery (prepare, encode, gallery delete and compact) first takes the lease of
its root, ``<root>/.writer-lease.json``::

    {"format": "opqn-lease", "id": "<uuid>", "host": "...", "pid": 123, "command": "...",
     "started": <unix time>, "expires": <unix time>, "released": false}

Taking it is a compare-and-swap of that document (storage/manifest_swap.py: ``IfNoneMatch='*'``
to create it and ``IfMatch=<etag>`` to take over on S3; flock + compare + rename on local
disk), so of two jobs starting together exactly one wins; the other fails at once with a
``LeaseHeldError`` naming the holder and its age. The holder renews it (a heartbeat thread,
every third of its duration) and checks it before every commit (``Lease.check``). A lease is
free when released, when expired (its holder was killed or lost the store), or, on the same
host, when its process no longer exists: a crashed run's lease is taken over by the next run.
A holder whose lease was taken over (it stalled past expiry) gets ``LeaseLostError`` at its
next check and must stop before committing.

Expiry compares wall clocks of the hosts involved; keep them in sync (NTP), and choose a
duration well above the longest stall of a job (``DEFAULT_SECONDS``).

Taking a lease the same thread already holds (nested jobs) shares it: released when the
outermost holder releases it.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator

from . import urls
from .errors import StorageError
from .manifest import orphans
from .manifest_swap import store_for

log = logging.getLogger(__name__)

LEASE_NAME = ".writer-lease.json"
LEASE_LOCK = ".writer-lease.lock"
FORMAT = "opqn-lease"
DEFAULT_SECONDS = 120.0

# Called as hook(lease) in the job's thread right after it takes a lease (not when a nested holder
# shares one). Tests append a hook to hold a job there while a second job starts.
ACQUIRE_HOOKS: list[Callable[["Lease"], None]] = []

_HELD: dict[tuple[str, threading.Thread], "Lease"] = {}  # (root, thread) -> the lease that thread holds
_HELD_LOCK = threading.Lock()


class LeaseHeldError(StorageError):
    """Another job holds the lease of the dataset or gallery; ``holder`` is its document."""

    def __init__(self, message: str, url: str | None = None, holder: dict | None = None):
        super().__init__(message, url)
        self.holder = holder or {}


class LeaseLostError(StorageError):
    """This job's lease expired and another job took it over: stop before committing."""


def describe(doc: dict, now: float | None = None) -> str:
    """``host pid 123 (command), started 12 s ago, expires in 108 s``."""
    now = time.time() if now is None else now
    left = float(doc.get("expires", now)) - now
    return (f"host {doc.get('host', '?')} pid {doc.get('pid', '?')} ({doc.get('command', '?')}), started "
            f"{now - float(doc.get('started', now)):.0f} s ago, "
            + (f"expires in {left:.0f} s" if left > 0 else f"expired {-left:.0f} s ago"))


def _parse(data: bytes | None) -> dict | None:
    if data is None:
        return None
    try:
        doc = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return {}  # unreadable: treated as free (a torn write of a lease never blocks forever)
    return doc if isinstance(doc, dict) and doc.get("format") == FORMAT else {}


def _pid_alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, TypeError, ValueError, OverflowError):
        return True  # exists under another user, or not a pid we can judge
    return True


def is_free(doc: dict | None, now: float | None = None) -> bool:
    """Whether a lease document lets a new writer in: absent, unreadable, released, expired,
    or held by a process of this host that no longer exists."""
    now = time.time() if now is None else now
    if not doc or doc.get("released"):
        return True
    try:
        if float(doc.get("expires", 0)) <= now:
            return True
    except (TypeError, ValueError):
        return True
    return doc.get("host") == socket.gethostname() and not _pid_alive(doc.get("pid"))


def _root_key(root: str) -> str:
    return urls.resolve(root)[1] if urls.is_local(root) else root.rstrip("/")


class Lease:
    """A held lease: ``check()`` before each commit, ``release()`` (or ``held(...)``) at the end."""

    def __init__(self, root: str, command: str, seconds: float, storage_options: dict | None):
        self.root, self.command, self.seconds = root, command, float(seconds)
        self.url = urls.join(root, LEASE_NAME)
        self.id = uuid.uuid4().hex
        self.started = self.expires = 0.0
        self._store = store_for(root, storage_options, LEASE_NAME, LEASE_LOCK)
        self._storage_options = storage_options
        self._token = None
        self._lost: str | None = None
        self._depth = 1
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def _doc(self, expires: float, released: bool = False) -> bytes:
        return json.dumps({"format": FORMAT, "id": self.id, "host": socket.gethostname(), "pid": os.getpid(),
                           "command": self.command, "started": self.started, "expires": expires,
                           "released": released}).encode()

    def _take(self, attempts: int = 5) -> None:
        for _ in range(attempts):
            data, token = self._store.load()
            doc, now = _parse(data), time.time()
            if not is_free(doc, now):
                raise LeaseHeldError(f"{self.root} is being written by another job: {describe(doc, now)}; "
                                     "wait for it to finish (or for its lease to expire) and run again",
                                     self.url, doc)
            if doc and not doc.get("released"):
                log.warning("taking over the lease of %s from %s", self.root, describe(doc, now))
            self.started = now
            self.expires = now + self.seconds
            new_token = self._store.swap(self._doc(self.expires), token)
            if new_token:
                self._token = new_token
                return
        raise LeaseHeldError(f"{self.root}: another job took the writer lease at the same moment; run again",
                             self.url)

    def renew(self) -> None:
        """Push the expiry ``seconds`` ahead; ``LeaseLostError`` if another job took the lease."""
        with self._lock:
            if self._lost:
                raise LeaseLostError(self._lost, self.url)
            expires = time.time() + self.seconds
            new_token = self._store.swap(self._doc(expires), self._token)
            if not new_token:
                data, _ = self._store.load()
                doc = _parse(data) or {}
                self._lost = (f"lost the writer lease of {self.root} (it expired and was taken over by "
                              f"{describe(doc)}); this job stops without committing more")
                raise LeaseLostError(self._lost, self.url)
            self._token, self.expires = new_token, expires

    def check(self) -> None:
        """Raise ``LeaseLostError`` unless this job still holds the lease (call before committing)."""
        if self._lost:
            raise LeaseLostError(self._lost, self.url)
        if time.time() >= self.expires:  # the heartbeat could not renew in time: renew now or fail
            self.renew()

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.seconds / 3):
            try:
                self.renew()
            except LeaseLostError:
                log.error("%s", self._lost)
                return
            except Exception as exc:  # noqa: BLE001 - a store hiccup: retry at the next beat
                log.warning("could not renew the writer lease of %s: %s", self.root, exc)

    def _start_heartbeat(self) -> None:
        self._thread = threading.Thread(target=self._heartbeat, name=f"lease {self.root}", daemon=True)
        self._thread.start()

    def release(self) -> None:
        """Give the lease up (outermost holder only); a lease already lost is left to its new holder."""
        self._depth -= 1
        if self._depth > 0:
            return
        with _HELD_LOCK:
            for key in [k for k, v in _HELD.items() if v is self]:
                del _HELD[key]
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        with self._lock:
            if self._lost:
                return
            try:
                self._store.swap(self._doc(time.time(), released=True), self._token)
            except StorageError as exc:  # it expires on its own
                log.warning("could not release the writer lease of %s: %s", self.root, exc)


def acquire(root: str, command: str | None = None, seconds: float = DEFAULT_SECONDS,
            storage_options: dict | None = None, heartbeat: bool = True) -> Lease:
    """Take the writer lease of ``root`` or raise ``LeaseHeldError`` naming its holder."""
    if seconds <= 0:
        raise ValueError(f"lease seconds must be > 0, got {seconds}")
    key = (_root_key(root), threading.current_thread())
    with _HELD_LOCK:
        mine = _HELD.get(key)
        if mine is not None:
            mine._depth += 1
            return mine
    lease = Lease(root, command or " ".join(sys.argv)[:200], seconds, storage_options)
    lease._take()
    with _HELD_LOCK:
        _HELD[key] = lease
    if heartbeat:
        lease._start_heartbeat()
    try:
        for hook in ACQUIRE_HOOKS:
            hook(lease)
    except BaseException:
        lease.release()
        raise
    return lease


@contextlib.contextmanager
def held(root: str, command: str | None = None, seconds: float = DEFAULT_SECONDS,
         storage_options: dict | None = None) -> Iterator[Lease]:
    """``with held(root, ...) as lease:`` the job's writes; released on the way out."""
    lease = acquire(root, command, seconds, storage_options)
    try:
        yield lease
    finally:
        lease.release()


def holding(root: str) -> Lease | None:
    """The lease this thread holds on ``root``, if any."""
    with _HELD_LOCK:
        return _HELD.get((_root_key(root), threading.current_thread()))


def sweepable_orphans(root: str, storage_options: dict | None = None, older_than: float = 0.0) -> list[str]:
    """Unlisted files under ``root`` older than this thread's lease on it (relative paths), and
    at least ``older_than`` seconds old.

    Only a lease holder may delete files no manifest lists, and only those written before it
    took the lease: anything newer belongs to a job that still thinks it is writing."""
    lease = holding(root)
    if lease is None:
        raise RuntimeError(f"deleting unlisted files under {root} needs its writer lease (storage.lease.held)")
    cutoff = min(lease.started, time.time() - older_than)
    fs, _ = urls.resolve(root, storage_options)
    out = []
    for rel in orphans(root, storage_options):
        try:
            info = fs.info(urls.resolve(urls.join(root, rel), storage_options)[1])
        except FileNotFoundError:
            continue
        if _mtime(info) < cutoff:
            out.append(rel)
    return out


def _mtime(info: dict) -> float:
    value = info.get("mtime", info.get("LastModified", info.get("created")))
    if hasattr(value, "timestamp"):
        return value.timestamp()
    return float(value) if value is not None else 0.0

