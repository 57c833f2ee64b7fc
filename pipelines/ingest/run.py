"""The ingest driver: list -> hash -> plan -> shards on the execution layer -> commit finished shards.

Thin on purpose (like img2dataset's distributor): every decision is made by plain functions
(``sources``, ``plan``, ``splits``, ``shards``, ``photos``); this module hands shards to
``pipelines.execution.run_tasks`` (one task per shard, a bounded number in flight), lists the
finished shards in the manifest (those finishing within ``commit_seconds`` in one commit), and
prints progress.

Executor ``ray`` (the default): Ray in-process on 127.0.0.1, the cluster named by
``RAY_ADDRESS`` when set, or whatever Ray the caller already initialised (all through
``pipelines.execution.start_ray``). On a cluster the source and the dataset URLs must be
reachable from every node (s3://, or a shared file system). Executor ``local``: the same
shard function, one shard after another in this process (no Ray).

Resume and incremental runs: the ``sources`` table lists every photo already processed, so a
re-run (after a crash or after photos were added) processes only the photos not yet listed.
One writer per dataset: the run holds the dataset's writer lease (storage.lease) from start to
end, so a second prepare into the same dataset fails at once naming the first; a killed run's
lease is taken over. Files written but never committed (a killed run) are deleted first.
"""
from __future__ import annotations

import logging
import os
import sys
from collections import Counter
from dataclasses import dataclass, field

from storage import lease, urls
from storage import manifest as mf

from pipelines import execution
from pipelines.commit_groups import CommitGroups
from pipelines.formats import faces as face_format
from pipelines.progress import Progress, format_seconds, say

from .config import IngestConfig
from .plan import hash_many, plan_photos
from .shards import shard_task
from .sources import list_sources

log = logging.getLogger(__name__)

HASH_CHUNK = 256  # photos per hashing task on an object store


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
    source, dataset = urls.absolute(source), urls.absolute(dataset)  # tasks run elsewhere, cwd too
    opts = config.storage_options or None
    with lease.held(dataset, f"opqn prepare {source} {dataset}", config.lease_seconds, opts) as held:
        return _prepare(source, dataset, config, stream or sys.stderr, progress_interval, held)


def _prepare(source: str, dataset: str, config: IngestConfig, stream, progress_interval: float,
             held: lease.Lease) -> PrepareResult:
    """``prepare_dataset`` while holding the dataset's writer lease."""
    opts = config.storage_options or None
    listing = list_sources(source, opts)
    result = PrepareResult(dataset=dataset, photos=len(listing))

    _check_settings(mf.read_manifest(dataset, opts), dataset, config)
    for rel in face_format.delete_uncommitted(dataset, opts):
        log.info("deleted uncommitted file %s/%s", dataset, rel)
    done = face_format.read_sources(dataset, opts).to_pylist()
    done_sources = {r["source"] for r in done}
    pending = [s for s in listing if s.url not in done_sources]
    result.skipped = len(listing) - len(pending)
    say("prepare", f"[prepare] {len(listing)} photos under {source}: {len(pending)} to process, "
        f"{result.skipped} already in {dataset}", stream)
    progress = Progress(len(pending), "photos", "prepare", interval=progress_interval, stream=stream)
    if not pending:
        say("prepare", result.summary(), stream)
        return result

    if config.executor == "ray":
        execution.start_ray(worker_logs=False)
    readable = [s.url for s in pending if not s.problem]
    hashes = {h["url"]: h for h in _hash_pass(readable, config)}
    items = plan_photos(pending, hashes, done, config)
    workers = _workers(config)
    size = shard_length(len(items), config, workers)
    shards = [items[i:i + size] for i in range(0, len(items), size)]

    settings = config.recorded()
    rejected: Counter = Counter()
    nodes: Counter = Counter()
    threads = max(1, config.torch_threads) if config.executor == "ray" else 0
    done_shards = execution.run_tasks(shard_task, shards, shared=(dataset, config, threads),
                                      executor=config.executor, max_in_flight=min(workers, len(shards)),
                                      num_cpus=max(1, config.torch_threads))
    commits = CommitGroups(config.commit_seconds, held=held,
                           commit=lambda done: face_format.commit_shard(dataset, [e for es in done for e in es],
                                                                        settings, opts))
    for _, stats in done_shards:
        nodes[stats["node"]] += 1
        commits.add(stats["entries"])
        result.shards += 1
        result.processed += stats["photos"]
        result.faces += stats["faces"]
        rejected.update(stats["rejected"])
        progress.update(stats["photos"], extra=f"{result.faces} faces")
    commits.flush(force=True)
    result.rejected = dict(rejected)
    result.nodes = dict(nodes)
    result.seconds = progress.elapsed()
    say("prepare", result.summary(), stream)
    return result


def _check_settings(manifest, dataset: str, config: IngestConfig) -> None:
    """A dataset holds crops of one size/format/split protocol; refuse to mix settings."""
    old = face_format.recorded_settings(manifest)
    if not old:
        return
    new = config.recorded()
    # a setting newer than the dataset's manifest was, there, its default
    old = {**IngestConfig().recorded(), **old}
    diff = {k: (old.get(k), new[k]) for k in new if old.get(k) != new[k]}
    if diff:
        details = ", ".join(f"{k}: dataset has {a!r}, asked for {b!r}" for k, (a, b) in diff.items())
        raise ValueError(f"dataset {dataset} was prepared with other settings ({details}); "
                         "use the same settings or a new dataset URL")


def _hash_pass(urls: list[str], config: IngestConfig) -> list[dict]:
    """Content hashes of the new photos: driver threads for local files (and in-process runs);
    for object stores, tasks of ``HASH_CHUNK`` photos (each reading with threads) spread over
    the cluster and its network bandwidth. Reading is cheap next to detection."""
    if not urls:
        return []
    from storage.urls import is_local

    opts = config.storage_options or None
    if len(urls) <= 64 or is_local(urls[0]) or config.executor == "local":
        return hash_many(urls, config.max_bytes, opts)
    chunks = [urls[i:i + HASH_CHUNK] for i in range(0, len(urls), HASH_CHUNK)]
    hashed = execution.run_tasks(hash_many, chunks, shared=(config.max_bytes, opts), spread=True)
    return [h for _, part in hashed for h in part]


def shard_length(photos: int, config: IngestConfig, workers: int) -> int:
    """Photos per shard: ``shard_size``, but small enough that every worker gets about two
    shards on a small run (and never below one detector batch)."""
    per_worker = -(-photos // (2 * max(1, workers)))
    return max(1, min(config.shard_size, max(config.batch_size, per_worker)))


def _workers(config: IngestConfig) -> int:
    """Shards processed at once: ``num_workers``, else one per ``torch_threads`` CPUs of the
    cluster (of this machine for in-process runs)."""
    if config.num_workers:
        return config.num_workers
    cpus = execution.cluster_cpus() if config.executor == "ray" else (os.cpu_count() or 1)
    return max(1, cpus // max(1, config.torch_threads))
