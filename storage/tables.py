"""Parquet tables on any URL, streamed in record batches.

Memory stays bounded by one batch (plus the object store's upload buffer) whatever the
size of the dataset: writers take an iterable of batches and write one row group per
batch; readers yield batches row group by row group. Writes are atomic at file level
(see ``storage.files.atomic_writer``).
"""
from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from . import urls
from .errors import StorageNotFoundError, errors_naming
from .files import atomic_writer

DEFAULT_BATCH_SIZE = 65_536

TableLike = pa.Table | pa.RecordBatch | pa.RecordBatchReader | Iterable[pa.RecordBatch | pa.Table]


@dataclasses.dataclass(frozen=True)
class WrittenFile:
    """What a write produced: enough to list the file in a manifest without re-reading it."""

    url: str
    rows: int
    size: int
    sha256: str


def write_table(url: str, table_or_batches: TableLike, schema: pa.Schema | None = None,
                storage_options: dict | None = None, *, exclusive: bool = False,
                compression: str = "zstd", row_group_size: int | None = None) -> WrittenFile:
    """Write a Parquet file at ``url`` from a table or an iterable of record batches.

    ``schema`` is required when the iterable may be empty; otherwise it is taken from the
    first batch, and every later batch must match it. The file appears at ``url`` only
    when complete; ``exclusive=True`` refuses to replace an existing file.
    """
    batches, schema = _batches_and_schema(table_or_batches, schema, url)
    rows = 0
    with atomic_writer(url, storage_options, exclusive=exclusive) as sink:
        with pq.ParquetWriter(sink, schema, compression=compression) as writer:
            for batch in batches:
                if not batch.schema.equals(schema):
                    raise ValueError(
                        f"writing {url}: batch schema {batch.schema} differs from {schema}"
                    )
                if batch.num_rows:
                    writer.write_batch(batch, row_group_size=row_group_size)
                    rows += batch.num_rows
    return WrittenFile(url=url, rows=rows, size=sink.size, sha256=sink.sha256)


def iter_batches(url: str, columns: list[str] | None = None,
                 batch_size: int = DEFAULT_BATCH_SIZE,
                 storage_options: dict | None = None) -> Iterator[pa.RecordBatch]:
    """Yield the rows of the Parquet file at ``url`` as record batches of ``batch_size``."""
    with open_parquet(url, storage_options) as pf:
        yield from pf.iter_batches(batch_size=batch_size, columns=columns)


def read_table(url: str, columns: list[str] | None = None,
               storage_options: dict | None = None) -> pa.Table:
    """The whole Parquet file at ``url`` as a table (for small files; else iterate)."""
    with open_parquet(url, storage_options) as pf:
        return pf.read(columns=columns)


def read_schema(url: str, storage_options: dict | None = None) -> pa.Schema:
    """The Arrow schema of the Parquet file at ``url`` (reads the footer only)."""
    with open_parquet(url, storage_options) as pf:
        return pf.schema_arrow


@contextlib.contextmanager
def open_parquet(url: str, storage_options: dict | None = None):
    """Open ``url`` as a ParquetFile; errors name the URL (a missing file: StorageNotFoundError)."""
    fs, path = urls.resolve(url, storage_options)
    with errors_naming(url, "read"):
        try:
            f = fs.open(path, "rb")
        except FileNotFoundError as exc:
            raise StorageNotFoundError(f"not found: {url}", url) from exc
        with f:
            yield pq.ParquetFile(f)


def _batches_and_schema(data: TableLike, schema: pa.Schema | None, url: str):
    """Normalise the accepted inputs to (iterator of RecordBatch, schema)."""
    if isinstance(data, pa.Table):
        schema = schema or data.schema
        return iter(data.cast(schema).to_batches()), schema
    if isinstance(data, pa.RecordBatch):
        schema = schema or data.schema
        return iter([data]), schema
    if isinstance(data, pa.RecordBatchReader):
        schema = schema or data.schema
        return iter(data), schema
    it = _flatten(iter(data))
    if schema is not None:
        return it, schema
    try:
        first = next(it)
    except StopIteration:
        raise ValueError(f"writing {url}: no batches and no schema given") from None
    return _chain(first, it), first.schema


def _flatten(items) -> Iterator[pa.RecordBatch]:
    for item in items:
        if isinstance(item, pa.Table):
            yield from item.to_batches()
        elif isinstance(item, pa.RecordBatch):
            yield item
        else:
            raise TypeError(f"expected pyarrow RecordBatch or Table, got {type(item).__name__}")


def _chain(first, rest):
    yield first
    yield from rest
