"""Checkpoint bytes on any URL.

The caller serialises with torch (this package never imports torch) and loads with
``torch.load(..., weights_only=True)`` so no pickle from storage is ever executed.
"""
from __future__ import annotations

import os
import uuid

import fsspec


def write_bytes(url: str, data: bytes, storage_options: dict | None = None) -> None:
    """Write ``data`` to ``url`` so a reader never sees a partial file.

    Local disk: write a unique temporary file beside the target and rename it over.
    Object stores: a single PUT is already all-or-nothing.
    """
    fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
    if _is_local(fs):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex}"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    else:
        fs.pipe_file(path, data)


def read_bytes(url: str, storage_options: dict | None = None) -> bytes:
    fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
    if not fs.exists(path):
        raise FileNotFoundError(f"checkpoint not found: {url}")
    return fs.cat_file(path)


def exists(url: str, storage_options: dict | None = None) -> bool:
    fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
    return fs.exists(path)


def _is_local(fs) -> bool:
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return protocol in ("file", "local")
