"""Exceptions raised by ``storage``.

Two families, so callers can tell "the store is unreachable or refused us" (retry later,
fix credentials) from "the data itself is wrong" (do not retry, do not overwrite):

- ``StorageError`` (an ``OSError``): an I/O failure at a URL. Subclasses for missing
  objects, existing objects (exclusive writes), refused credentials and unreachable
  endpoints also derive from the matching builtin (``FileNotFoundError``,
  ``FileExistsError``, ``PermissionError``, ``ConnectionError``) so generic handlers
  keep working.
- ``ManifestError`` (a ``ValueError``): a manifest or a file it lists is malformed,
  unsafe, missing or corrupt. Every message names the manifest URL and the file.

Messages name URLs, never credentials.
"""
from __future__ import annotations

import contextlib
import errno


class StorageError(OSError):
    """An I/O failure at ``url``; the message says what was attempted and why it failed."""

    def __init__(self, message: str, url: str | None = None):
        super().__init__(message)
        self.url = url

    def __str__(self) -> str:  # OSError's default would print the args tuple
        return self.args[0]


class StorageNotFoundError(StorageError, FileNotFoundError):
    """Nothing exists at ``url``."""


class StorageExistsError(StorageError, FileExistsError):
    """Something already exists at ``url`` and the write was exclusive."""


class StorageAuthError(StorageError, PermissionError):
    """The object store refused the credentials (wrong key, wrong secret, no access)."""


class StorageUnavailableError(StorageError, ConnectionError):
    """The object store could not be reached (down, wrong endpoint, timeouts)."""


class ManifestError(ValueError):
    """A manifest (or a file it lists) is invalid. ``manifest`` and ``path`` say which."""

    def __init__(self, message: str, manifest: str | None = None, path: str | None = None):
        super().__init__(message)
        self.manifest = manifest
        self.path = path


class UnsafePathError(ManifestError):
    """A manifest lists a path that would escape its root (``..``, absolute, a URL)."""


class IntegrityError(ManifestError):
    """A listed data file is missing or its size/checksum differs from the manifest."""


class CommitConflictError(StorageError):
    """A manifest commit lost the compare-and-swap race more times than allowed."""


_AUTH_CODES = {
    "InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "ExpiredToken",
    "InvalidToken", "AllAccessDisabled", "AccountProblem", "RequestTimeTooSkewed", "403",
}


def _client_error_code(exc: BaseException) -> str | None:
    """The S3 error code behind ``exc`` (s3fs re-raises botocore errors as OSError)."""
    for e in (exc, exc.__cause__, exc.__context__):
        response = getattr(e, "response", None)
        if isinstance(response, dict):
            code = response.get("Error", {}).get("Code")
            if code:
                return str(code)
    return None


def is_precondition_failed(exc: BaseException) -> bool:
    """True when an S3 conditional write (IfMatch / IfNoneMatch) was refused."""
    return _client_error_code(exc) in {"PreconditionFailed", "412", "ConditionalRequestConflict", "409"}


def translate(exc: BaseException, url: str, action: str) -> BaseException:
    """Turn a low-level failure into a ``StorageError`` subclass whose message names ``url``.

    Our own exceptions pass through unchanged.
    """
    if isinstance(exc, (StorageError, ManifestError)):
        return exc
    detail = f"{type(exc).__name__}: {exc}"
    code = _client_error_code(exc)
    if isinstance(exc, FileNotFoundError) or code in {"NoSuchKey", "NoSuchBucket", "404"}:
        return StorageNotFoundError(f"cannot {action} {url}: not found ({detail})", url)
    if isinstance(exc, FileExistsError) or is_precondition_failed(exc):
        # exclusive create refused (S3 IfNoneMatch='*'; some servers omit the condition)
        return StorageExistsError(f"cannot {action} {url}: it already exists", url)
    if isinstance(exc, PermissionError) or code in _AUTH_CODES:
        return StorageAuthError(
            f"cannot {action} {url}: the object store refused the credentials or access "
            f"({detail}); check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY and the endpoint",
            url,
        )
    if _is_connection_failure(exc):
        return StorageUnavailableError(
            f"cannot {action} {url}: the object store is unreachable ({detail}); "
            "check AWS_ENDPOINT_URL and that the server is up",
            url,
        )
    return StorageError(f"cannot {action} {url}: {detail}", url)


def _is_connection_failure(exc: BaseException) -> bool:
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    if isinstance(exc, OSError) and exc.errno in {errno.ECONNREFUSED, errno.ECONNRESET, errno.ETIMEDOUT}:
        return True
    try:
        from botocore import exceptions as bex
    except ImportError:  # pragma: no cover - botocore ships with s3fs
        return False
    return isinstance(exc, (bex.ConnectionError, bex.HTTPClientError, bex.ConnectTimeoutError,
                            bex.ReadTimeoutError))


@contextlib.contextmanager
def errors_naming(url: str, action: str):
    """Re-raise I/O failures inside the block as ``StorageError`` naming ``url``."""
    try:
        yield
    except (StorageError, ManifestError):
        raise
    except Exception as exc:  # noqa: BLE001 - translated and re-raised, never swallowed
        if not _is_io_failure(exc):
            raise
        raise translate(exc, url, action) from exc


def _is_io_failure(exc: BaseException) -> bool:
    if isinstance(exc, OSError):
        return True
    try:
        from botocore import exceptions as bex
    except ImportError:  # pragma: no cover
        return False
    return isinstance(exc, (bex.BotoCoreError, bex.ClientError))
