"""Checkpoint bytes on any URL.

The caller serialises with torch (this package never imports torch) and loads with
``torch.load(..., weights_only=True)`` so no pickle from storage is ever executed.
"""
from __future__ import annotations

from . import files
from .errors import StorageNotFoundError


def write_bytes(url: str, data: bytes, storage_options: dict | None = None) -> None:
    """Write ``data`` to ``url`` so a reader never sees a partial file.

    Local disk: write a unique temporary file beside the target and rename it over.
    Object stores: a single PUT (or multipart complete) is already all-or-nothing.
    Failures raise ``storage.errors.StorageError`` naming the URL.
    """
    files.write_bytes_atomic(url, bytes(data), storage_options)


def read_bytes(url: str, storage_options: dict | None = None) -> bytes:
    """All bytes of the checkpoint at ``url``; ``FileNotFoundError`` naming it if absent."""
    try:
        return files.read_all(url, storage_options)
    except StorageNotFoundError as exc:
        raise StorageNotFoundError(f"checkpoint not found: {url}", url) from exc


def exists(url: str, storage_options: dict | None = None) -> bool:
    """Whether a checkpoint exists at ``url``."""
    return files.exists(url, storage_options)
