"""Exact re-rank: the PQ scan's top-R candidates re-scored by the cosine of float features.

With ``QueryConfig.rerank = R`` (a gallery encoded with ``--store-features``):

1. The PQ scan keeps the global top-R per query by the usual rule (LUT score desc, then
   gallery position (shard, row) asc), exactly as a ``top_k = R`` query would.
2. Each candidate gets its exact score: ``exact = cosine(query feature, stored feature)``,
   both sides l2-normalised, the dot product taken in float64 and rounded to float32
   (``pipelines.inference.exact_cosine``), the stored side being the float16 feature of the
   gallery's feature shard (``pipelines.gallery``).
3. The top-k of the R candidates by (exact desc, then gallery position (shard, row) asc) are
   the results, ``score`` = the exact cosine.

Where the exact scores are computed: in the scan tasks. A task that has merged its shards'
top-R reads, for each of its shards holding a candidate, only the row groups of that shard's
feature file that hold candidates (feature shards are written in row groups of
``pipelines.gallery.FEATURE_ROW_GROUP`` rows), and attaches ``exact`` to its top-R rows. The driver merges the
tasks' top-R by the PQ order as before (so the candidate set is the global PQ top-R, whatever
the grouping of shards into tasks) and only then orders by ``exact``. The driver never reads a
feature; a task holds one row group of features at a time and computes scores in chunks of
``PAIR_CHUNK`` (query, row) pairs, so memory stays bounded by the shard size and nq x R, as for
a plain ``top_k = R`` query. (The alternative, the driver fetching the features of the merged
top-R, would read nearly every feature shard in one process, serially.) A task re-scores its
own top-R, some of which lose the global merge: at most nq x R x D multiply-adds per task.
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa

from pipelines.gallery import feature_matrix
from pipelines.inference import exact_cosine
from pipelines.query.topk import TOPK_SCHEMA, ShardTask, best_per_query, empty_topk
from storage.tables import open_parquet

RERANK_SCHEMA = TOPK_SCHEMA.append(pa.field("exact", pa.float32()))
PAIR_CHUNK = 2048  # (query, candidate) pairs scored at once: PAIR_CHUNK x D float64 per side (16 MiB at D=1024)


def check_depth(top_k: int, rerank: int) -> int:
    """The scan depth: R when re-ranking (R >= top_k required), else top_k."""
    if rerank < 0:
        raise ValueError(f"rerank must be >= 0 (0: no re-rank), got {rerank}")
    if rerank and rerank < top_k:
        raise ValueError(f"rerank R={rerank} must be >= top_k={top_k}: the exact re-rank picks the top-k "
                         f"from the PQ scan's top-R candidates")
    return rerank or top_k


def attach_exact(best: pa.Table, shards: list[ShardTask], query_features: np.ndarray,
                 storage_options: dict | None = None) -> pa.Table:
    """``best`` (a top-k table over ``shards``) with the column ``exact`` (RERANK_SCHEMA)."""
    exact = np.full(best.num_rows, np.nan, np.float32)
    if best.num_rows:
        q_all = best.column("query").to_numpy()
        shard_all = best.column("shard").to_numpy()
        row_all = best.column("row").to_numpy()
        fid_all = best.column("face_id").combine_chunks()
        by_index = {s.index: s for s in shards}
        for index in np.unique(shard_all):
            shard = by_index[int(index)]
            if not shard.features_url:
                raise ValueError(f"code shard {shard.url} has no feature shard: cannot re-rank")
            at = np.flatnonzero(shard_all == index)
            exact[at] = _shard_exact(shard, q_all[at], row_all[at], fid_all.take(pa.array(at)),
                                     query_features, storage_options)
    if np.isnan(exact).any():
        raise AssertionError("a candidate got no exact score")
    return best.append_column(RERANK_SCHEMA.field("exact"), pa.array(exact, pa.float32()))


def _shard_exact(shard: ShardTask, queries: np.ndarray, rows: np.ndarray, face_ids: pa.Array,
                 query_features: np.ndarray, storage_options: dict | None) -> np.ndarray:
    """Exact scores of the (query, row) candidates of one shard, reading only their row groups."""
    out = np.empty(len(rows), np.float32)
    D = query_features.shape[1]
    with open_parquet(shard.features_url, storage_options) as pf:
        sizes = [pf.metadata.row_group(g).num_rows for g in range(pf.metadata.num_row_groups)]
        starts = np.concatenate([[0], np.cumsum(sizes)])
        if starts[-1] != shard.rows:
            raise ValueError(f"feature shard {shard.features_url} has {starts[-1]} rows, its code shard "
                             f"{shard.url} {shard.rows}")
        group_of = np.searchsorted(starts, rows, side="right") - 1
        for g in np.unique(group_of):
            table = pf.read_row_group(int(g), columns=["face_id", "feature"])
            feats = feature_matrix(table, D, shard.features_url)
            at = np.flatnonzero(group_of == g)
            local = rows[at] - starts[g]
            got = table.column("face_id").combine_chunks().take(pa.array(local))
            if not got.equals(face_ids.take(pa.array(at))):
                raise ValueError(f"feature shard {shard.features_url} does not hold the faces of {shard.url} "
                                 f"row for row: the gallery is damaged")
            for c0 in range(0, len(at), PAIR_CHUNK):
                sl = slice(c0, c0 + PAIR_CHUNK)
                out[at[sl]] = exact_cosine(query_features[queries[at[sl]]], feats[local[sl]])
    return out


def rerank_topk(candidates: pa.Table, k: int) -> pa.Table:
    """Top-k per query of re-scored candidates by (exact desc, shard, row); ``score`` := exact."""
    if not candidates.num_rows:
        return empty_topk()
    top = best_per_query(candidates, k, score="exact")
    return pa.table({"query": top.column("query"), "score": top.column("exact"), "shard": top.column("shard"),
                     "row": top.column("row"), "face_id": top.column("face_id")}, schema=TOPK_SCHEMA)
