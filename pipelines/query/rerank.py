"""Re-rank: the PQ scan's top-R candidates re-scored by the cosine of float features (exact) or
by a compact refine code.

With ``QueryConfig.rerank = R`` (a gallery encoded with ``--store-features``):

1. The PQ scan keeps the global top-R per query by the usual rule (LUT score desc, then
   gallery position (shard, row) asc), exactly as a ``top_k = R`` query would.
2. Each candidate gets its exact score: ``exact = cosine(query feature, stored feature)``,
   both sides l2-normalised, the dot product taken in float64 and rounded to float32
   (``model.features.exact_cosine``), the stored side being the float16 feature of the
   gallery's feature shard (``pipelines.formats.gallery``).
3. The top-k of the R candidates by (exact desc, then gallery position (shard, row) asc) are
   the results, ``score`` = the exact cosine.

Where the exact scores are computed: in the scan tasks. A task that has merged its shards'
top-R reads, for each of its shards holding a candidate, only the row groups of that shard's
feature file that hold candidates (feature shards are written in row groups of
``pipelines.formats.gallery.FEATURE_ROW_GROUP`` rows), and attaches ``exact`` to its top-R rows. The driver merges the
tasks' top-R by the PQ order as before (so the candidate set is the global PQ top-R, whatever
the grouping of shards into tasks) and only then orders by ``exact``. The driver never reads a
feature; a task holds one row group of features at a time and computes scores in chunks of
``PAIR_CHUNK`` (query, row) pairs, so memory stays bounded by the shard size and nq x R, as for
a plain ``top_k = R`` query. (The alternative, the driver fetching the features of the merged
top-R, would read nearly every feature shard in one process, serially.) A task re-scores its
own top-R, some of which lose the global merge: at most nq x R x D multiply-adds per task.

With ``QueryConfig.refine = R`` (a gallery encoded with ``--refine-bytes B``) everything above
holds with the refine shard in place of the feature shard and, in step 2, ``exact`` = the
refine score ``dot(q, x_hat)``: the l2-normalised query feature with the candidate's decoded
refine vector (``model.refine.RefineQuantizer.pair_scores``, float64 rounded to float32).
A ``Rescorer`` says which of the two a query uses; ``--rerank`` and ``--refine`` are
alternatives (asking for both is an error: the exact one is the better re-rank where the
gallery has features, and chaining them is not built).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from model.features import exact_cosine
from model.refine import RefineQuantizer
from pipelines.formats.gallery import feature_matrix, refine_matrix
from pipelines.query.topk import TOPK_SCHEMA, ShardTask, best_per_query, empty_topk
from storage.tables import open_parquet

RERANK_SCHEMA = TOPK_SCHEMA.append(pa.field("exact", pa.float32()))
PAIR_CHUNK = 2048  # (query, candidate) pairs scored at once: PAIR_CHUNK x D float64 per side (16 MiB at D=1024)


def check_depth(top_k: int, rerank: int, name: str = "rerank") -> int:
    """The scan depth: R when re-ranking (R >= top_k required), else top_k."""
    if rerank < 0:
        raise ValueError(f"{name} must be >= 0 (0: no re-rank), got {rerank}")
    if rerank and rerank < top_k:
        raise ValueError(f"{name} R={rerank} must be >= top_k={top_k}: the re-rank picks the top-k "
                         f"from the PQ scan's top-R candidates")
    return rerank or top_k


@dataclass(frozen=True)
class Rescorer:
    """How scan tasks re-score their candidates: the column of the paired shard
    (``ShardTask.rescore_url``) and the score of a (query, stored row) pair.

    ``queries``: the query features (nq, D) for the exact cosine; for the refine code the
    projected normalised queries (nq, dim) float64, with ``offsets`` (nq,) = dot(q, mean)."""

    column: str  # "feature" (exact cosine) or "refine" (refine code)
    queries: np.ndarray
    offsets: np.ndarray | None = None
    quantizer: RefineQuantizer | None = None

    @classmethod
    def exact(cls, query_features: np.ndarray) -> "Rescorer":
        return cls("feature", np.asarray(query_features))

    @classmethod
    def refine(cls, quantizer: RefineQuantizer, query_features: np.ndarray) -> "Rescorer":
        projected, offsets = quantizer.query_side(query_features)
        return cls("refine", projected, offsets, quantizer)

    def matrix(self, table: pa.Table, url: str) -> np.ndarray:
        """The stored rows (features or refine codes) of a row group of a paired shard, checked."""
        if self.quantizer is None:
            return feature_matrix(table, self.queries.shape[1], url)
        return refine_matrix(table, self.quantizer.bytes, url)

    def scores(self, queries: np.ndarray, stored: np.ndarray) -> np.ndarray:
        """float32 score of each (query index, stored row) pair, row by row."""
        if self.quantizer is None:
            return exact_cosine(self.queries[queries], stored)
        return self.quantizer.pair_scores(self.queries[queries], self.offsets[queries], stored)


def attach_exact(best: pa.Table, shards: list[ShardTask], rescorer: Rescorer,
                 storage_options: dict | None = None) -> pa.Table:
    """``best`` (a top-k table over ``shards``) with the column ``exact`` (RERANK_SCHEMA): each
    candidate's re-rank score by ``rescorer``."""
    exact = np.full(best.num_rows, np.nan, np.float32)
    if best.num_rows:
        q_all = best.column("query").to_numpy()
        shard_all = best.column("shard").to_numpy()
        row_all = best.column("row").to_numpy()
        fid_all = best.column("face_id").combine_chunks()
        by_index = {s.index: s for s in shards}
        for index in np.unique(shard_all):
            shard = by_index[int(index)]
            if not shard.rescore_url:
                raise ValueError(f"code shard {shard.url} has no paired {rescorer.column} shard: cannot re-rank")
            at = np.flatnonzero(shard_all == index)
            exact[at] = _shard_exact(shard, q_all[at], row_all[at], fid_all.take(pa.array(at)),
                                     rescorer, storage_options)
    if np.isnan(exact).any():
        raise AssertionError("a candidate got no exact score")
    return best.append_column(RERANK_SCHEMA.field("exact"), pa.array(exact, pa.float32()))


def _shard_exact(shard: ShardTask, queries: np.ndarray, rows: np.ndarray, face_ids: pa.Array,
                 rescorer: Rescorer, storage_options: dict | None) -> np.ndarray:
    """Re-rank scores of the (query, row) candidates of one shard, reading only their row groups."""
    out = np.empty(len(rows), np.float32)
    url = shard.rescore_url
    with open_parquet(url, storage_options) as pf:
        sizes = [pf.metadata.row_group(g).num_rows for g in range(pf.metadata.num_row_groups)]
        starts = np.concatenate([[0], np.cumsum(sizes)])
        if starts[-1] != shard.rows:
            raise ValueError(f"{rescorer.column} shard {url} has {starts[-1]} rows, its code shard "
                             f"{shard.url} {shard.rows}")
        group_of = np.searchsorted(starts, rows, side="right") - 1
        for g in np.unique(group_of):
            table = pf.read_row_group(int(g), columns=["face_id", rescorer.column])
            stored = rescorer.matrix(table, url)
            at = np.flatnonzero(group_of == g)
            local = rows[at] - starts[g]
            got = table.column("face_id").combine_chunks().take(pa.array(local))
            if not got.equals(face_ids.take(pa.array(at))):
                raise ValueError(f"{rescorer.column} shard {url} does not hold the faces of {shard.url} "
                                 f"row for row: the gallery is damaged")
            for c0 in range(0, len(at), PAIR_CHUNK):
                sl = slice(c0, c0 + PAIR_CHUNK)
                out[at[sl]] = rescorer.scores(queries[at[sl]], stored[local[sl]])
    return out


def rerank_topk(candidates: pa.Table, k: int) -> pa.Table:
    """Top-k per query of re-scored candidates by (exact desc, shard, row); ``score`` := exact."""
    if not candidates.num_rows:
        return empty_topk()
    top = best_per_query(candidates, k, score="exact")
    return pa.table({"query": top.column("query"), "score": top.column("exact"), "shard": top.column("shard"),
                     "row": top.column("row"), "face_id": top.column("face_id")}, schema=TOPK_SCHEMA)
