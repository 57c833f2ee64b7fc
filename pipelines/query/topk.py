"""Per-shard top-k and the merge into a global top-k.

Positions: a gallery code is at ``(shard, row)``, ``shard`` its file's index among the code
shards in the gallery manifest's order and ``row`` its row in that file (counted before
tombstoned rows are dropped). Every ranking here is by score desc, then (shard, row) asc: the
gallery's global order. Re-sharding that keeps the global order of the codes (splitting or
concatenating files in manifest order) therefore gives the same results, and so does any
grouping of shards into tasks, because the merge key is total.

A top-k table (``TOPK_SCHEMA``) holds, per query index, its best rows, ordered by
(query, score desc, shard, row).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from pipelines.formats.gallery import live_rows, read_codes
from pipelines.query.kernels import topk as kernel_topk

TOPK_SCHEMA = pa.schema([("query", pa.int32()), ("score", pa.float32()), ("shard", pa.int32()),
                         ("row", pa.int64()), ("face_id", pa.string())])


@dataclass(frozen=True)
class ShardTask:
    """One code shard to scan: its manifest position, URL and row count (and, when the query
    re-ranks, the URL of its paired feature or refine shard: ``pipelines.query.rerank``)."""

    index: int
    url: str
    rows: int
    rescore_url: str | None = None


def empty_topk() -> pa.Table:
    return TOPK_SCHEMA.empty_table()


def shard_topk(tables: np.ndarray, shard: ShardTask, k: int, deleted: pa.Array | None = None,
               kernel: str = "auto", storage_options: dict | None = None) -> pa.Table:
    """Top-k of one code shard for every query, tombstoned faces left out."""
    M = tables.shape[1]
    face_ids, codes = read_codes(shard.url, M, storage_options)
    rows = live_rows(face_ids, deleted)
    if rows is not None:
        codes = codes[rows]
    scores, local = kernel_topk(tables, codes, k, kernel)
    nq, kk = scores.shape
    if kk == 0:
        return empty_topk()
    row = local.ravel() if rows is None else rows[local.ravel()]
    return pa.table({"query": np.repeat(np.arange(nq, dtype=np.int32), kk), "score": scores.ravel(),
                     "shard": np.full(nq * kk, shard.index, np.int32), "row": row.astype(np.int64),
                     "face_id": face_ids.take(pa.array(row))}, schema=TOPK_SCHEMA)


def best_per_query(table: pa.Table, k: int, score: str = "score") -> pa.Table:
    """The best ``k`` rows per query, ordered by (query, ``score`` desc, shard, row): the one tie
    rule of every top-k here, so code scores and re-ranked scores order the same way."""
    q = table.column("query").to_numpy()
    s = table.column(score).to_numpy()
    shard = table.column("shard").to_numpy()
    row = table.column("row").to_numpy()
    order = np.lexsort((row, shard, -s, q))
    qs = q[order]
    rank = np.arange(len(qs)) - np.searchsorted(qs, qs, side="left")
    return table.take(pa.array(order[rank < k]))


def merge_topk(parts: list[pa.Table], k: int) -> pa.Table:
    """The best ``k`` per query of several top-k tables, ordered by (query, score desc, shard, row)."""
    parts = [p for p in parts if p.num_rows]
    if not parts:
        return empty_topk()
    return best_per_query(pa.concat_tables(parts), k)


def group_shards(shards: list[ShardTask], rows_per_task: int, max_shards_per_task: int = 0) -> list[list[ShardTask]]:
    """Consecutive shards in groups of about ``rows_per_task`` codes (at least one shard each)."""
    groups: list[list[ShardTask]] = []
    current: list[ShardTask] = []
    rows = 0
    for shard in shards:
        if current and (rows + shard.rows > rows_per_task or (max_shards_per_task and len(current) >= max_shards_per_task)):
            groups.append(current)
            current, rows = [], 0
        current.append(shard)
        rows += shard.rows
    if current:
        groups.append(current)
    return groups
