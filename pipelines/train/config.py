"""Configuration of a distributed training run: the shared recipe plus data and cluster settings."""
from __future__ import annotations

from dataclasses import dataclass

from pipelines.recipe import Recipe


@dataclass
class RayTrainConfig(Recipe):
    dataset: str = ""  # face dataset URL (ingest output: <dataset>/faces/part-*.parquet)
    model_url: str = ""  # checkpoint URL; every worker must reach it (shared disk or s3://)
    train_splits: tuple = ("database", "train")  # split values used for training
    crop_fraction: float = 1.0  # face shards hold aligned crops: use all of it
    workers: int = 2
    use_gpu: bool = False
    threads_per_worker: int = 1
    cpus_per_worker: float = 1.0
    max_failures: int = 3  # worker-group restarts before the run fails (-1: unlimited)
    shuffle_buffer: int = 2048  # rows in each worker's local shuffle buffer
    cache_decoded: bool = False  # keep decoded crops in the Ray object store after the first epoch
    resume: bool = True  # continue from the checkpoint at model_url if one exists
    storage_path: str = ""  # Ray Train run storage (shared by all nodes); "" = beside a local model_url
    run_id: str = ""  # set by the driver; lets retries resume even with resume=False
