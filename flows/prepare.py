"""Prefect flow ``prepare-dataset``: schedules the ingest stage; all logic is in ``pipelines.ingest``."""
from __future__ import annotations

from prefect import flow

from flows.options import config_with_options, options_model
from pipelines.ingest.config import IngestConfig
from pipelines.ingest.run import prepare_dataset

FLOW_PARAMETERS = ("size", "image_format", "keep_all", "protocol", "query_fraction", "unseen_fraction", "min_photos",
                   "seed", "shard_size")
PrepareOptions = options_model(IngestConfig, exclude=FLOW_PARAMETERS + ("storage_options",))


@flow(name="prepare-dataset", log_prints=True, retries=1, retry_delay_seconds=30)
def prepare_dataset_flow(source: str, dataset: str, size: int = 112, image_format: str = "png",
                         keep_all: bool = False, protocol: str = "single", query_fraction: float = 0.2,
                         unseen_fraction: float = 0.2, min_photos: int = 1, seed: int = 0,
                         shard_size: int = 500, options: PrepareOptions | None = None) -> dict:
    """Prepare DATASET from the photos under SOURCE; returns the run's counts.

    ``options`` takes any other `opqn prepare` setting by name (batch_size, min_face_size,
    thresholds, num_workers, ...); unknown names are rejected before anything starts.
    """
    config = config_with_options(IngestConfig, "prepare", dict(
        size=size, image_format=image_format, keep_all=keep_all, protocol=protocol, query_fraction=query_fraction,
        unseen_fraction=unseen_fraction, min_photos=min_photos, seed=seed, shard_size=shard_size), options,
        hidden=("storage_options",))
    result = prepare_dataset(source, dataset, config)
    return {"dataset": result.dataset, "photos": result.photos, "processed": result.processed,
            "skipped": result.skipped, "faces": result.faces, "rejected": result.rejected}
