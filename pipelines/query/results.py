"""Query results on storage: one Parquet file, or a results dataset that a killed job resumes.

The rule is the URL: ``RESULTS`` ending in ``.parquet`` is one Parquet file, written whole at
the end of the job (streamed block by block, so memory stays bounded, but a crash loses the
run); any other URL is a results dataset folder:

``<results>/manifest.json`` (storage.manifest) lists ``<results>/blocks/part-*.parquet``, one
file per query block, in query order. Each block is written, then committed with the
position its queries end at; so a killed job leaves every finished block listed, and the
next run starts at the first position not committed (``done``). A run that finds nothing
new commits nothing. The manifest's metadata ``query_results`` holds::

    {"format": "opqn-query-results", "version": 1, "done": <positions answered>,
     "queries": <queries answered>, "ids_sha256": <digest of the ids of positions [0, done)>,
     "key": {model id, gallery URL and generation, top_k, rerank, refine, split, crop_fraction}}

A run whose ``key`` differs (another model, a gallery that changed since, another top-k) or
whose first ``done`` query ids differ is refused: those results would mix two answers.

Rows (``RESULT_SCHEMA``, the same for both): query_id, rank (0 = best), face_id, score.
``read_results`` reads either form.
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa

from storage import manifest as mf
from storage.tables import read_table, write_table

RESULT_SCHEMA = pa.schema([("query_id", pa.string()), ("rank", pa.int32()), ("face_id", pa.string()),
                           ("score", pa.float32())])
KIND = "opqn-query-results"
VERSION = 1
BLOCKS_DIR = "blocks"
META = "query_results"


def is_single_file(results_url: str) -> bool:
    """``.parquet`` URLs are one results file; anything else is a results dataset folder."""
    return results_url.rstrip("/").lower().endswith(".parquet")


def results_table(best: pa.Table, query_ids: list[str]) -> pa.Table:
    """Top-k rows (query, score desc, shard, row order) -> the result contract."""
    q = best.column("query").to_numpy()
    rank = (np.arange(len(q)) - np.searchsorted(q, q, side="left")).astype(np.int32)
    return pa.table({"query_id": pa.array(query_ids, pa.string()).take(pa.array(q)), "rank": rank,
                     "face_id": best.column("face_id"), "score": best.column("score")}, schema=RESULT_SCHEMA)


def result_files(results_url: str, storage_options: dict | None = None) -> list[str]:
    """The Parquet files holding the results: the file itself, or a results dataset's
    committed blocks in query order (for readers that stream instead of ``read_results``)."""
    if is_single_file(results_url):
        return [results_url]
    manifest = mf.read_manifest(results_url, storage_options)
    if manifest is None:
        raise FileNotFoundError(f"no query results at {results_url} (no manifest.json)")
    return [mf.file_url(results_url, e) for e in manifest.files]


def read_results(results_url: str, storage_options: dict | None = None) -> pa.Table:
    """Every result row of a results file or dataset (committed blocks, in query order)."""
    parts = [read_table(url, storage_options=storage_options) for url in result_files(results_url, storage_options)]
    return pa.concat_tables(parts) if parts else RESULT_SCHEMA.empty_table()


class ResultsDataset:
    """The resumable results folder: where the last run stopped, and one commit per block."""

    def __init__(self, url: str, key: dict, storage_options: dict | None = None):
        self.url, self.key, self.storage_options = url, key, storage_options
        manifest = mf.read_manifest(url, storage_options)
        meta = manifest.metadata.get(META) if manifest is not None else None
        if manifest is not None and manifest.files and meta is None:
            raise ValueError(f"{url} holds a dataset that is not query results: write the results elsewhere")
        self.meta = meta or {"format": KIND, "version": VERSION, "done": 0, "queries": 0,
                             "ids_sha256": None, "key": key}
        if self.meta.get("version", 0) > VERSION:
            raise ValueError(f"query results {url} have version {self.meta.get('version')}; this code reads up to "
                             f"{VERSION}")
        if self.meta["key"] != key:
            changed = sorted(k for k in set(key) | set(self.meta["key"]) if key.get(k) != self.meta["key"].get(k))
            raise ValueError(f"query results {url} were made with other settings ({', '.join(changed)}: "
                             f"{ {k: self.meta['key'].get(k) for k in changed} } there, "
                             f"{ {k: key.get(k) for k in changed} } now): resuming would mix two answers; "
                             f"write the results to a new RESULTS URL")
        self.rows = manifest.rows if manifest is not None else 0
        self.committed = manifest is not None

    @property
    def done(self) -> int:
        return int(self.meta["done"])

    @property
    def queries(self) -> int:
        return int(self.meta["queries"])

    def check_prefix(self, digest: str) -> None:
        """Refuse to resume when the first ``done`` query ids are not the ones answered."""
        if self.done and digest != self.meta["ids_sha256"]:
            raise ValueError(f"query results {self.url} answered the first {self.done} queries of another query "
                             f"set (their ids differ now): write the results to a new RESULTS URL")

    def commit_block(self, table: pa.Table, start: int, end: int, queries: int, digest: str) -> None:
        """Write one block's results and list it, with the new resume position, in one commit."""
        entry = mf.write_data_file(self.url, table, subdir=BLOCKS_DIR, prefix="block", schema=RESULT_SCHEMA,
                                   storage_options=self.storage_options)
        self._commit(start, {"done": end, "queries": self.queries + queries, "ids_sha256": digest}, (entry,))
        self.rows += table.num_rows

    def commit_empty(self) -> None:
        """A manifest with no blocks, so an empty query set still leaves a readable results dataset."""
        if not self.committed:
            self._commit(0, {}, ())

    def _commit(self, start: int, update: dict, entries: tuple) -> None:
        def change(current: mf.Manifest) -> mf.Manifest:
            meta = current.metadata.get(META) or self.meta
            if int(meta["done"]) != start:  # another writer got there first
                raise ValueError(f"query results {self.url}: another job committed up to position {meta['done']} "
                                 f"while this one answered from {start}; run one job per RESULTS URL")
            return mf.Delta(add=entries, metadata={META: {**meta, **update}}).apply(current)

        committed = mf.commit(self.url, change, self.storage_options)
        self.meta = dict(committed.metadata[META])
        self.committed = True


def write_results_file(results_url: str, tables, storage_options: dict | None = None) -> int:
    """Stream result tables (one per block) into one Parquet file; its row count."""
    return write_table(results_url, tables, schema=RESULT_SCHEMA, storage_options=storage_options).rows
