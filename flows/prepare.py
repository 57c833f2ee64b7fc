"""Prefect flow ``prepare-dataset``: schedules the ingest stage; all logic is in ``pipelines.ingest``."""
from __future__ import annotations

from prefect import flow

from pipelines.ingest.config import IngestConfig
from pipelines.ingest.run import prepare_dataset


@flow(name="prepare-dataset", log_prints=True)
def prepare_dataset_flow(source: str, dataset: str, size: int = 112, image_format: str = "png",
                         keep_all: bool = False, protocol: str = "single", query_fraction: float = 0.2,
                         unseen_fraction: float = 0.2, min_photos: int = 1, seed: int = 0,
                         shard_size: int = 500) -> dict:
    """Prepare DATASET from the photos under SOURCE; returns the run's counts."""
    config = IngestConfig(size=size, image_format=image_format, keep_all=keep_all, protocol=protocol,
                          query_fraction=query_fraction, unseen_fraction=unseen_fraction,
                          min_photos=min_photos, seed=seed, shard_size=shard_size)
    result = prepare_dataset(source, dataset, config)
    return {"dataset": result.dataset, "photos": result.photos, "processed": result.processed,
            "skipped": result.skipped, "faces": result.faces, "rejected": result.rejected}
