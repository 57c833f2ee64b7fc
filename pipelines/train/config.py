"""Configuration of a distributed training run: the shared recipe plus data and cluster settings."""
from __future__ import annotations

from dataclasses import dataclass

from pipelines.train.recipe import Recipe


@dataclass
class RayTrainConfig(Recipe):
    dataset: str = ""  # face dataset URL (ingest output: <dataset>/faces/part-*.parquet)
    model_url: str = ""  # checkpoint URL; every worker must reach it (shared disk or s3://)
    train_splits: tuple = ("database", "train")  # split values used for training
    crop_fraction: float = 1.0  # face shards hold aligned crops: use all of it
    workers: int = 2
    use_gpu: bool = False
    threads_per_worker: int = 0  # torch threads in each worker; 0 = the worker's CPUs (cpus_per_worker)
    cpus_per_worker: float = 1.0
    max_failures: int = 3  # worker-group restarts before the run fails (-1: unlimited)
    shuffle_buffer: int = 2048  # rows in each worker's local shuffle buffer
    cache_mb: int = 4096  # decoded faces each worker keeps in memory across epochs; a larger share streams from Ray Data
    resume: bool = True  # continue from the checkpoint at model_url if one exists
    storage_path: str = ""  # Ray Train run storage (shared by all nodes); "" = beside a local model_url
    run_id: str = ""  # set by the driver; lets retries resume even with resume=False

    def worker_threads(self) -> int:
        return self.threads_per_worker or max(1, int(self.cpus_per_worker))

    def share_mb(self, rows: int) -> float:
        """Decoded bytes of one worker's share of ``rows`` faces, in MB."""
        return rows / max(1, self.workers) * 3 * self.stored_size() ** 2 / 2**20
