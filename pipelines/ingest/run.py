"""The ingest driver: list -> hash -> plan -> shards on Ray Data -> commit each shard.

Thin on purpose (like img2dataset's distributor): every decision is made by plain functions
(``sources``, ``plan``, ``splits``, ``shards``, ``photos``); this module hands shards to Ray
Data, commits each finished shard to the manifest, and prints progress.

Ray: in-process by default (``ray.init()`` on 127.0.0.1), the cluster named by ``RAY_ADDRESS``
when set, or whatever Ray the caller already initialised. On a cluster the source and the
dataset URLs must be reachable from every node (s3://, or a shared file system).

Resume and incremental runs: the ``sources`` table lists every photo already processed, so a
re-run (after a crash or after photos were added) processes only the photos not yet listed.
Files written but never committed (a killed run) are deleted first: one writer per dataset.
"""
from __future__ import annotations

import json
import logging
import os
import sys
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from storage import files as sfiles
from storage import manifest as mf

from pipelines.progress import Progress, format_seconds

from . import dataset as ds_io
from .config import IngestConfig
from .plan import hash_many, hash_one, plan_photos
from .shards import FACES_DIR, REJECTS_DIR, SOURCES_DIR, process_shard
from .sources import list_sources

log = logging.getLogger(__name__)

FORMAT = "opqn-faces"
VERSION = 1


@dataclass
class PrepareResult:
    dataset: str
    photos: int = 0  # photos listed in the source
    processed: int = 0  # photos processed by this run
    skipped: int = 0  # photos already in the dataset
    faces: int = 0  # face rows written by this run
    rejected: dict = field(default_factory=dict)  # reason -> count, this run
    shards: int = 0
    seconds: float = 0.0
    nodes: dict = field(default_factory=dict)  # Ray node id -> shards it processed

    def summary(self) -> str:
        reasons = ", ".join(f"{k}={v}" for k, v in sorted(self.rejected.items())) or "none"
        return (f"[prepare] done: {self.processed} photos processed ({self.skipped} already in the dataset), "
                f"{self.faces} faces written, {sum(self.rejected.values())} rejected ({reasons}), "
                f"{self.shards} shards in {format_seconds(self.seconds)} -> {self.dataset}")


def prepare_dataset(source: str, dataset: str, config: IngestConfig | None = None, *,
                    stream=None, progress_interval: float = 5.0) -> PrepareResult:
    """Turn the photos under ``source`` into face shards under ``dataset`` (both URLs).

    Returns what this run did. Safe to re-run: only photos not yet in the dataset are
    processed. Raises ``ValueError`` when the dataset was prepared with different settings.
    """
    config = config or IngestConfig()
    stream = stream or sys.stderr
    opts = config.storage_options or None
    listing = list_sources(source, opts)
    result = PrepareResult(dataset=dataset, photos=len(listing))

    current = mf.read_manifest(dataset, opts)
    _check_settings(current, dataset, config)
    _delete_uncommitted(dataset, opts)
    done = ds_io.read_sources(dataset, opts).to_pylist()
    done_sources = {r["source"] for r in done}
    pending = [s for s in listing if s.url not in done_sources]
    result.skipped = len(listing) - len(pending)
    print(f"[prepare] {len(listing)} photos under {source}: {len(pending)} to process, "
          f"{result.skipped} already in {dataset}", file=stream, flush=True)
    progress = Progress(len(pending), "photos", "prepare", interval=progress_interval, stream=stream)
    if not pending:
        print(result.summary(), file=stream, flush=True)
        return result

    ray = _ensure_ray()
    readable = [s.url for s in pending if not s.problem]
    hashes = {h["url"]: h for h in _hash_pass(ray, readable, config)}
    items = plan_photos(pending, hashes, done, config)
    workers = _workers(ray, config)
    size = shard_length(len(items), config, workers)
    tasks = [items[i:i + size] for i in range(0, len(items), size)]

    metadata = {"ingest": {"format": FORMAT, "version": VERSION, "config": config.recorded()}}
    rejected: Counter = Counter()
    nodes: Counter = Counter()
    for stats in _run_shards(ray, tasks, dataset, config, workers):
        nodes[stats.get("node")] += 1
        entries = [mf.FileEntry(**e) for e in stats["entries"]]
        mf.commit(dataset, mf.Delta(add=tuple(entries), metadata=metadata), opts)
        result.shards += 1
        result.processed += stats["photos"]
        result.faces += stats["faces"]
        rejected.update(stats["rejected"])
        progress.update(stats["photos"], extra=f"{result.faces} faces")
    result.rejected = dict(rejected)
    result.nodes = dict(nodes)
    result.seconds = progress.elapsed()
    print(result.summary(), file=stream, flush=True)
    return result


def _check_settings(manifest, dataset: str, config: IngestConfig) -> None:
    """A dataset holds crops of one size/format/split protocol; refuse to mix settings."""
    old = (manifest.metadata.get("ingest") or {}).get("config") if manifest else None
    if not old:
        return
    new = config.recorded()
    diff = {k: (old.get(k), new[k]) for k in new if old.get(k) != new[k]}
    if diff:
        details = ", ".join(f"{k}: dataset has {a!r}, asked for {b!r}" for k, (a, b) in diff.items())
        raise ValueError(f"dataset {dataset} was prepared with other settings ({details}); "
                         "use the same settings or a new dataset URL")


def _delete_uncommitted(dataset: str, opts) -> None:
    """Remove data files a crashed run wrote but never committed (single writer per dataset)."""
    for rel in mf.orphans(dataset, opts):
        if rel.split("/")[0] in (FACES_DIR, REJECTS_DIR, SOURCES_DIR):
            log.info("deleting uncommitted file %s/%s", dataset, rel)
            sfiles.delete(mf.file_url(dataset, rel), opts)


def _ensure_ray():
    """Use the caller's Ray, else the cluster at RAY_ADDRESS, else start one in-process on loopback."""
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    if not ray.is_initialized():
        address = os.environ.get("RAY_ADDRESS")
        # "local" always starts a private instance; a bare ray.init() would attach to any
        # cluster someone started on this machine with `ray start`.
        kwargs = {} if address else {"address": "local", "include_dashboard": False, "_node_ip_address": "127.0.0.1"}
        ray.init(address=address or kwargs.pop("address"), configure_logging=False, log_to_driver=False, **kwargs)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    return ray


def _hash_pass(ray, urls: list[str], config: IngestConfig) -> list[dict]:
    """Content hashes of the new photos: driver threads for local files, Ray Data for object stores
    (spread over the cluster's network bandwidth). Reading is cheap next to detection."""
    if not urls:
        return []
    from storage.urls import is_local

    if len(urls) <= 64 or is_local(urls[0]):  # local disk: driver threads beat a Ray Data job
        return hash_many(urls, config.max_bytes, config.storage_options or None)
    max_bytes, opts = config.max_bytes, config.storage_options or None

    def hash_batch(batch: dict) -> dict:
        rows = [hash_one(u, max_bytes, opts) for u in batch["url"]]
        return {k: np.array([r[k] for r in rows], dtype=object) for k in ("url", "content_hash", "reason", "detail")}

    data = ray.data.from_items([{"url": u} for u in urls], override_num_blocks=max(1, min(64, len(urls) // 256)))
    return data.map_batches(hash_batch, batch_size=256, batch_format="numpy").take_all()


_DETECTORS: dict = {}


def _detector(config: IngestConfig):
    """One MTCNN per worker process, kept between tasks and runs (Ray reuses task workers)."""
    import torch

    from .mtcnn import MTCNN

    torch.set_num_threads(max(1, config.torch_threads))
    key = (config.min_face_size, tuple(config.thresholds))
    if key not in _DETECTORS:
        _DETECTORS[key] = MTCNN(min_face_size=config.min_face_size, thresholds=config.thresholds)
    return _DETECTORS[key]


def _shard_batch(batch: dict, dataset: str, config: IngestConfig) -> dict:
    """Ray Data task: process whole shards (one per row) with the process's cached detector."""
    import ray

    detector = _detector(config)
    node = ray.get_runtime_context().get_node_id()
    out = [json.dumps({**process_shard(json.loads(t), dataset, config, detector), "node": node}) for t in batch["task"]]
    return {"stats": np.array(out, dtype=object)}


def shard_length(photos: int, config: IngestConfig, workers: int) -> int:
    """Photos per shard: ``shard_size``, but small enough that every worker gets about two
    shards on a small run (and never below one detector batch)."""
    per_worker = -(-photos // (2 * max(1, workers)))
    return max(1, min(config.shard_size, max(config.batch_size, per_worker)))


def _workers(ray, config: IngestConfig) -> int:
    cpus = int(ray.cluster_resources().get("CPU", 1))
    return max(1, config.num_workers or cpus // max(1, config.torch_threads))


def _run_shards(ray, tasks: list[list[dict]], dataset: str, config: IngestConfig, workers: int):
    """Yield each shard's stats as soon as it is written (streaming, any order)."""
    workers = max(1, min(workers, len(tasks)))
    data = ray.data.from_items([{"task": json.dumps(t)} for t in tasks], override_num_blocks=len(tasks))
    results = data.map_batches(
        _shard_batch,
        fn_kwargs={"dataset": dataset, "config": config},
        batch_size=1,
        batch_format="numpy",
        compute=ray.data.TaskPoolStrategy(size=workers),
        num_cpus=max(1, config.torch_threads),
    )
    for row in results.iter_rows():
        yield json.loads(row["stats"])
