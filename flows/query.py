"""Prefect flow ``query-batch``: schedules batch retrieval; all logic is in ``pipelines.query``."""
from __future__ import annotations

from dataclasses import fields

from prefect import flow

from pipelines.query.run import QueryConfig, query_batch


def _config(top_k: int, split: str, options: dict) -> QueryConfig:
    known = {f.name for f in fields(QueryConfig)} - {"top_k", "split"}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(f"unknown query options {unknown}; valid: {sorted(known)}")
    return QueryConfig(top_k=top_k, split=split, **options)


@flow(name="query-batch", log_prints=True)
def query_batch_flow(model_url: str, gallery: str, queries: str, results: str, top_k: int = 100,
                     split: str = "query", options: dict | None = None) -> dict:
    """Rank GALLERY for every face of QUERIES with the model at MODEL_URL; write RESULTS (Parquet).

    ``options`` takes any other `opqn query` setting by name (kernel, rows_per_task,
    max_in_flight, crop_fraction, ...); unknown names are rejected before anything starts.
    """
    summary = query_batch(model_url, gallery, queries, results, _config(top_k, split, options or {}))
    return {k: v for k, v in summary.items() if k != "config"}
