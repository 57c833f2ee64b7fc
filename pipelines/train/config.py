"""Configuration of a distributed training run: the shared recipe plus data and cluster settings."""
from __future__ import annotations

from dataclasses import dataclass, field

from pipelines.train.recipe import Recipe


@dataclass
class RayTrainConfig(Recipe):
    dataset: str = field(default="", metadata={"help": "face dataset URL (ingest output: "
                                                        "<dataset>/faces/part-*.parquet)"})
    model_url: str = field(default="", metadata={"help": "checkpoint URL; every worker must reach it "
                                                          "(shared disk or s3://)"})
    train_splits: tuple = field(default=("database", "train"), metadata={"help": "face splits trained on"})
    crop_fraction: float = field(default=1.0, metadata={"help": "centre square of each stored face used "
                                                                 "(face shards hold aligned crops: 1.0)"})
    workers: int = field(default=2, metadata={"help": "Ray Train workers (one process each, DDP)"})
    use_gpu: bool = field(default=False, metadata={"help": "one GPU per training worker (nccl)"})
    threads_per_worker: int = field(default=0, metadata={"help": "torch threads in each worker; 0: the "
                                                                  "worker's CPUs (--cpus-per-worker)"})
    cpus_per_worker: float = field(default=1.0, metadata={"help": "CPUs each training worker asks Ray for"})
    max_failures: int = field(default=3, metadata={"help": "worker-group restarts before the run fails "
                                                            "(-1: unlimited)"})
    shuffle_buffer: int = field(default=2048, metadata={"help": "rows in each worker's local shuffle buffer"})
    cache_mb: int = field(default=4096, metadata={"help": "decoded faces each worker keeps in memory across "
                                                           "epochs (MB); a larger share streams from Ray Data"})
    resume: bool = field(default=True, metadata={"help": "continue from the checkpoint at the model URL if "
                                                          "one exists"})
    storage_path: str = field(default="", metadata={"help": "Ray Train run storage shared by all nodes; "
                                                             "\"\": beside a local model URL"})
    run_id: str = field(default="", metadata={"help": "set by the driver; lets retries resume even with "
                                                       "--no-resume"})

    def worker_threads(self) -> int:
        return self.threads_per_worker or max(1, int(self.cpus_per_worker))

    def share_mb(self, rows: int) -> float:
        """Decoded bytes of one worker's share of ``rows`` faces, in MB."""
        return rows / max(1, self.workers) * 3 * self.stored_size() ** 2 / 2**20
