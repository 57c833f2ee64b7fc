"""Retrieval metrics over the full ranking of a database.

Ranking: score descending, ties broken by database index ascending (a stable sort), so a
result never depends on sort internals. Quantized codes tie often (identical codes score the
same); this rule is stated in every evaluation report.
"""
from __future__ import annotations

import numpy as np


def rank(scores: np.ndarray) -> np.ndarray:
    """Database indices per query, best first; ties by index ascending."""
    scores = np.asarray(scores)
    return np.argsort(-scores, axis=1, kind="stable")


def relevance(scores, query_labels, db_labels, exclude_no_relevant: bool = False):
    """Boolean relevance matrix in ranked order, and the mask of queries kept.

    A query with no relevant database item has no defined AP; that is an error unless
    ``exclude_no_relevant`` asks to drop such queries (their count is returned as kept=False).
    """
    scores = np.asarray(scores)
    query_labels, db_labels = np.asarray(query_labels), np.asarray(db_labels)
    if scores.ndim != 2 or scores.shape != (len(query_labels), len(db_labels)):
        raise ValueError(f"scores shape {scores.shape} does not match {len(query_labels)} queries x {len(db_labels)} database items")
    order = rank(scores)
    rel = db_labels[order] == query_labels[:, None]
    has = rel.any(axis=1)
    if not has.all() and not exclude_no_relevant:
        missing = np.flatnonzero(~has)
        raise ValueError(
            f"{len(missing)} queries have no relevant database item (first: query {missing[0]} "
            f"label {query_labels[missing[0]]!r}); pass exclude_no_relevant=True to skip them"
        )
    return rel[has], has


def average_precisions(rel: np.ndarray) -> np.ndarray:
    """AP per query from a ranked relevance matrix: mean of precision at each relevant rank."""
    cum = np.cumsum(rel, axis=1)
    precision = cum / np.arange(1, rel.shape[1] + 1)
    return (precision * rel).sum(axis=1) / rel.sum(axis=1)


def precision_at(rel: np.ndarray, ts) -> dict[int, float]:
    """Mean precision in the top T; T beyond the database size counts the whole database."""
    out = {}
    for t in ts:
        n = min(int(t), rel.shape[1])
        out[int(t)] = float(rel[:, :n].sum(axis=1).mean() / n)
    return out


def pr_curve(rel: np.ndarray, points: int = 100) -> dict[str, list[float]]:
    """Mean precision and recall over queries at ranking cut-offs spread over the database."""
    n = rel.shape[1]
    cutoffs = np.unique(np.linspace(1, n, num=min(points, n)).round().astype(int))
    cum = np.cumsum(rel, axis=1)[:, cutoffs - 1]
    total = rel.sum(axis=1, keepdims=True)
    return {"cutoffs": cutoffs.tolist(), "precision": (cum / cutoffs).mean(axis=0).tolist(),
            "recall": (cum / total).mean(axis=0).tolist()}


def retrieval_metrics(scores, query_labels, db_labels, ts=(1, 5, 10, 20, 50, 100),
                      exclude_no_relevant: bool = False, pr_points: int = 100,
                      chunk: int = 1024) -> dict:
    """mAP, P@T and the PR curve; queries are processed in chunks to bound memory."""
    scores = np.asarray(scores)
    query_labels = np.asarray(query_labels)
    aps, sums, kept = [], {int(t): 0.0 for t in ts}, 0
    pr_prec = pr_rec = None
    for start in range(0, len(query_labels), chunk):
        sl = slice(start, start + chunk)
        rel, _ = relevance(scores[sl], query_labels[sl], db_labels, exclude_no_relevant)
        if not len(rel):
            continue
        aps.append(average_precisions(rel))
        for t, v in precision_at(rel, ts).items():
            sums[t] += v * len(rel)
        pr = pr_curve(rel, pr_points)
        w = len(rel)
        p, r = np.array(pr["precision"]) * w, np.array(pr["recall"]) * w
        pr_prec = p if pr_prec is None else pr_prec + p
        pr_rec = r if pr_rec is None else pr_rec + r
        cutoffs = pr["cutoffs"]
        kept += w
    if kept == 0:
        raise ValueError("no query has a relevant database item: nothing to evaluate")
    return {
        "map": float(np.concatenate(aps).mean()),
        "precision_at": {t: s / kept for t, s in sums.items()},
        "pr": {"cutoffs": cutoffs, "precision": (pr_prec / kept).tolist(), "recall": (pr_rec / kept).tolist()},
        "queries": int(kept),
        "excluded_queries": int(len(query_labels) - kept),
        "database": int(scores.shape[1]),
        "tie_rule": "score descending, ties by database index ascending",
    }
