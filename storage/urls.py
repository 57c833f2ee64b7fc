"""One way to address data: a URL string resolved through fsspec.

Accepted forms: ``/abs/path``, ``relative/path`` (local disk, relative to the current
directory), ``file:///abs/path``, ``s3://bucket/prefix``. Any other fsspec protocol is
passed through to fsspec as is.

S3 endpoint, credentials and region come from the environment (the usual AWS variables:
``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``,
``AWS_DEFAULT_REGION``, ``AWS_ENDPOINT_URL``, ``AWS_MAX_ATTEMPTS``, ``AWS_RETRY_MODE``,
profiles...) or from explicit ``storage_options`` (a dict handed to s3fs, which wins).
Nothing here logs or prints credentials: log the URL.
"""
from __future__ import annotations

import hashlib
import os
import re
import threading

import fsspec

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://")
_LOCAL_PROTOCOLS = {"file", "local"}

# Environment variables that change which S3 client we must build. The cache key holds
# only a digest of them, so credentials never sit in a printable structure.
_S3_ENV = (
    "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
    "AWS_DEFAULT_REGION", "AWS_REGION", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3",
    "AWS_MAX_ATTEMPTS", "AWS_RETRY_MODE", "AWS_SHARED_CREDENTIALS_FILE", "AWS_CONFIG_FILE",
)

_cache: dict[tuple, fsspec.AbstractFileSystem] = {}
_cache_lock = threading.Lock()


def protocol(url: str) -> str:
    """The URL scheme (``file`` for bare paths)."""
    m = _SCHEME.match(str(url))
    return m.group(1).lower() if m else "file"


def is_local(url: str) -> bool:
    """True when ``url`` lives on the local filesystem (bare path or ``file://``)."""
    return protocol(url) in _LOCAL_PROTOCOLS


def join(url: str, *parts: str) -> str:
    """Append ``/``-separated ``parts`` to ``url``, keeping its scheme.

    Unlike ``posixpath.join`` an absolute-looking part never discards the base: the
    result always stays under ``url``. Parts are not checked for ``..`` here; manifest
    paths are validated by ``storage.manifest`` before they are joined.
    """
    url = str(url)
    pieces = [str(p).strip("/") for p in parts if str(p).strip("/")]
    if not pieces:
        return url
    return url.rstrip("/") + "/" + "/".join(pieces)  # "/" + "x" -> "/x"


def s3_options(storage_options: dict | None = None) -> dict:
    """s3fs options from the environment, overridden by explicit ``storage_options``.

    ``AWS_ENDPOINT_URL`` becomes ``client_kwargs.endpoint_url`` and ``AWS_DEFAULT_REGION``
    (or ``AWS_REGION``) ``client_kwargs.region_name``; keys are left for botocore to read
    from the environment unless given explicitly (``key``/``secret``/``token``).
    """
    explicit = dict(storage_options or {})
    client_kwargs = {}
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        client_kwargs["endpoint_url"] = endpoint
    region = os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION")
    if region:
        client_kwargs["region_name"] = region
    client_kwargs.update(explicit.pop("client_kwargs", None) or {})
    options = {"client_kwargs": client_kwargs} if client_kwargs else {}
    options.update(explicit)
    return options


def filesystem(url: str, storage_options: dict | None = None) -> fsspec.AbstractFileSystem:
    """The (cached) fsspec filesystem for ``url``'s protocol."""
    proto = protocol(url)
    if proto in _LOCAL_PROTOCOLS:
        return fsspec.filesystem("file")
    options = s3_options(storage_options) if proto in {"s3", "s3a"} else dict(storage_options or {})
    # fsspec caches instances by their options only; a change of credentials in the
    # environment must give a fresh client, so the key includes a digest of the env.
    env_digest = hashlib.sha256(
        "\0".join(os.environ.get(k, "") for k in _S3_ENV).encode()
    ).hexdigest()
    key = (proto, os.getpid(), env_digest, _freeze(options))
    with _cache_lock:
        fs = _cache.get(key)
        if fs is None:
            fs = fsspec.filesystem(proto, skip_instance_cache=True, **options)
            _cache[key] = fs
    return fs


def resolve(url: str, storage_options: dict | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """``(fs, path)`` for ``url``: the filesystem and the path it understands."""
    url = os.fspath(url)
    fs = filesystem(url, storage_options)
    if is_local(url):
        path = url[len("file://"):] if url.startswith("file://") else url
        if url.startswith("local://"):
            path = url[len("local://"):]
        return fs, os.path.abspath(os.path.expanduser(path))
    return fs, fs._strip_protocol(url)


def absolute(url: str) -> str:
    """``url`` with a local path made absolute (remote URLs unchanged): what to hand to tasks on
    other processes or nodes, whose working directory is not this one's."""
    url = os.fspath(url)
    return resolve(url)[1] if is_local(url) else url


def local_path(url: str) -> str:
    """Absolute local path for a local URL (raises ``ValueError`` for remote URLs)."""
    if not is_local(url):
        raise ValueError(f"{url} is not a local path")
    return resolve(url)[1]


def clear_cache() -> None:
    """Forget cached filesystems (e.g. after credentials rotate in-process)."""
    with _cache_lock:
        _cache.clear()


def _freeze(value):
    if isinstance(value, dict):
        return tuple(sorted((str(k), _freeze(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple, set)):
        return tuple(_freeze(v) for v in value)
    if isinstance(value, (str, int, float, bool, type(None))):
        return value
    return repr(value)  # objects (e.g. a botocore Config): identity-like repr
