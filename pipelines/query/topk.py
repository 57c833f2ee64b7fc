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


@dataclass(frozen=True)
class ShardCodes:
    """One code shard read for scoring: its face ids, the live rows' codes and those rows'
    numbers in the file (``rows`` None: every row is live)."""

    shard: ShardTask
    face_ids: pa.Array
    codes: np.ndarray
    rows: np.ndarray | None


def read_shard(shard: ShardTask, M: int, deleted: pa.Array | None = None,
               storage_options: dict | None = None) -> ShardCodes:
    """A code shard's live codes (tombstoned faces left out): the I/O half of ``shard_topk``."""
    face_ids, codes = read_codes(shard.url, M, storage_options)
    rows = live_rows(face_ids, deleted)
    return ShardCodes(shard, face_ids, codes if rows is None else codes[rows], rows)


def topk_table(parts: list[ShardCodes], scores: np.ndarray, local: np.ndarray) -> pa.Table:
    """The kernel's per-query best (``scores``, ``local`` rows of the parts' codes concatenated in
    order) as a top-k table: each row mapped back to its shard and row in that shard's file."""
    nq, kk = scores.shape
    if kk == 0:
        return empty_topk()
    flat = local.ravel()
    ends = np.cumsum([len(p.codes) for p in parts])
    which = np.searchsorted(ends, flat, side="right")
    within = flat - (ends - [len(p.codes) for p in parts])[which]
    row = np.empty(len(flat), np.int64)
    order = np.argsort(which, kind="stable")  # taken part by part, then put back in place
    face_ids = []
    for i, p in enumerate(parts):
        at = order[np.searchsorted(which[order], i, "left"):np.searchsorted(which[order], i, "right")]
        row[at] = within[at] if p.rows is None else p.rows[within[at]]
        face_ids.append(p.face_ids.take(pa.array(row[at])))
    face_id = pa.concat_arrays(face_ids).take(pa.array(np.argsort(order)))
    shard = np.array([p.shard.index for p in parts], np.int32)[which]
    return pa.table({"query": np.repeat(np.arange(nq, dtype=np.int32), kk), "score": scores.ravel(), "shard": shard,
                     "row": row, "face_id": face_id}, schema=TOPK_SCHEMA)


def shard_topk(tables: np.ndarray, shard: ShardTask, k: int, deleted: pa.Array | None = None,
               kernel: str = "auto", storage_options: dict | None = None) -> pa.Table:
    """Top-k of one code shard for every query, tombstoned faces left out."""
    part = read_shard(shard, tables.shape[1], deleted, storage_options)
    return topk_table([part], *kernel_topk(tables, part.codes, k, kernel))


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


def split_shards(shards: list[ShardTask], tasks: int, max_shards_per_task: int = 0) -> list[list[ShardTask]]:
    """Consecutive shards in about ``tasks`` groups of about equal codes: a shard joins the group
    its middle code falls in (then groups of at most ``max_shards_per_task`` shards, if set)."""
    total = sum(s.rows for s in shards)
    groups: dict[int, list[ShardTask]] = {}
    start = 0
    for shard in shards:
        groups.setdefault(min(tasks - 1, int((start + shard.rows / 2) * tasks / max(total, 1))), []).append(shard)
        start += shard.rows
    out = list(groups.values())
    if max_shards_per_task:
        out = [g[i:i + max_shards_per_task] for g in out for i in range(0, len(g), max_shards_per_task)]
    return out
