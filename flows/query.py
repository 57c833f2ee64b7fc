"""Prefect flow ``query-batch``: schedules batch retrieval; all logic is in ``pipelines.query``."""
from __future__ import annotations

from prefect import flow

from flows.options import config_with_options, options_model
from pipelines.query.run import QueryConfig, query_batch

QueryOptions = options_model(QueryConfig, exclude=("top_k", "split"))


@flow(name="query-batch", log_prints=True, retries=1, retry_delay_seconds=30)
def query_batch_flow(model_url: str, gallery: str, queries: str, results: str, top_k: int = 100,
                     split: str = "query", options: QueryOptions | None = None) -> dict:
    """Rank GALLERY for every face of QUERIES with the model at MODEL_URL; write RESULTS (Parquet).

    ``options`` takes any other `opqn query` setting by name (kernel, rows_per_task,
    max_in_flight, crop_fraction, ...); unknown names are rejected before anything starts.
    """
    summary = query_batch(model_url, gallery, queries, results, config_with_options(QueryConfig, "query", {"top_k": top_k, "split": split}, options))
    return {k: v for k, v in summary.items() if k != "config"}
