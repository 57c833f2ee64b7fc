"""Read a prepared face dataset through its manifest (never by globbing: unlisted files are not data).

All three tables of a dataset are listed in one manifest, so a commit adds a shard's faces,
rejects and source records together; these helpers pick a table by its folder.
"""
from __future__ import annotations

import pyarrow as pa

from storage import manifest as mf
from storage import tables

from .shards import FACE_SCHEMA, FACES_DIR, REJECT_SCHEMA, REJECTS_DIR, SOURCE_SCHEMA, SOURCES_DIR


def table_urls(dataset: str, folder: str, storage_options: dict | None = None) -> list[str]:
    """URLs of the committed files of one table (``faces``, ``rejects`` or ``sources``)."""
    manifest = mf.read_manifest(dataset, storage_options)
    if manifest is None:
        return []
    return [mf.file_url(dataset, e) for e in manifest.files if e.path.startswith(folder + "/")]


def read(dataset: str, folder: str, columns: list[str] | None = None, storage_options: dict | None = None) -> pa.Table:
    schema = {FACES_DIR: FACE_SCHEMA, REJECTS_DIR: REJECT_SCHEMA, SOURCES_DIR: SOURCE_SCHEMA}[folder]
    if columns:
        schema = pa.schema([schema.field(c) for c in columns])
    parts = [tables.read_table(u, columns, storage_options) for u in table_urls(dataset, folder, storage_options)]
    return pa.concat_tables(parts) if parts else schema.empty_table()


def read_faces(dataset: str, columns: list[str] | None = None, storage_options: dict | None = None) -> pa.Table:
    return read(dataset, FACES_DIR, columns, storage_options)


def read_rejects(dataset: str, storage_options: dict | None = None) -> pa.Table:
    return read(dataset, REJECTS_DIR, None, storage_options)


def read_sources(dataset: str, storage_options: dict | None = None) -> pa.Table:
    return read(dataset, SOURCES_DIR, None, storage_options)
