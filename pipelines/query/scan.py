"""The scan: one task's work over its group of code shards, and the fan-out over all groups.

A task (``scan_shards``) scores its shards one at a time (``topk.shard_topk``), merging as it
goes, so it holds one shard in memory; with a ``Rescorer`` it then attaches the re-rank score
of its top rows (``rerank.attach_exact``). ``scan_gallery`` runs one task per group through
``pipelines.execution.run_tasks`` (Ray tasks spread over the nodes, at most ``max_in_flight``
submitted at once, or in this process) and merges the tasks' top-k as they arrive, so the
driver holds only the tasks in flight and the running top-k, whatever the gallery size.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from pipelines.execution import node_id, run_tasks
from pipelines.progress import Progress
from pipelines.query.rerank import Rescorer, attach_exact
from pipelines.query.topk import ShardTask, empty_topk, merge_topk, shard_topk


@dataclass(frozen=True)
class ScanSettings:
    """What every scan task of a query shares besides the tables, tombstones and rescorer."""

    depth: int  # rows kept per query: top_k, or R when re-ranking
    kernel: str = "auto"
    storage_options: dict | None = None
    threads: int = 0  # torch/faiss threads of a task; 0 leaves the process's setting (in-process runs)


def scan_shards(tables: np.ndarray, shards: list[ShardTask], k: int, deleted: pa.Array | None = None,
                kernel: str = "auto", storage_options: dict | None = None, threads: int = 0,
                rescorer: Rescorer | None = None) -> pa.Table:
    """One task's work: each shard in turn (one in memory at a time), merged as it goes.

    With a ``rescorer`` the task's top-k rows also get their re-rank score (column ``exact``),
    from the shards' paired feature or refine files."""
    if threads:
        import faiss
        import torch

        torch.set_num_threads(threads)
        faiss.omp_set_num_threads(threads)
    best = empty_topk()
    for shard in shards:
        best = merge_topk([best, shard_topk(tables, shard, k, deleted, kernel, storage_options)], k)
    if rescorer is not None:
        best = attach_exact(best, shards, rescorer, storage_options)
    return best


def scan_task(group: list[ShardTask], tables: np.ndarray, deleted: pa.Array, rescorer: Rescorer | None,
              settings: ScanSettings) -> tuple[pa.Table, str]:
    """``scan_shards`` of one group, and the node it ran on ("local" in this process)."""
    best = scan_shards(tables, group, settings.depth, deleted, settings.kernel, settings.storage_options,
                       settings.threads, rescorer)
    return best, node_id()


def scan_gallery(tables: np.ndarray, groups: list[list[ShardTask]], deleted: pa.Array, settings: ScanSettings,
                 progress: Progress, *, executor: str = "ray", max_in_flight: int = 0, cpus_per_task: float = 1,
                 gpus_per_task: float = 0, nodes: set | None = None, rescorer: Rescorer | None = None) -> pa.Table:
    """The global top-``settings.depth`` table of every group's ``scan_task`` (with the ``exact``
    column when a ``rescorer`` is given); the Ray nodes that ran tasks are added to ``nodes``."""
    best = empty_topk()
    done_codes = 0
    # SPREAD: scans are I/O + memory bound, so use every node's bandwidth rather than packing
    results = run_tasks(scan_task, groups, shared=(tables, deleted, rescorer, settings), executor=executor,
                        max_in_flight=max_in_flight or None, num_cpus=cpus_per_task, num_gpus=gpus_per_task,
                        spread=True)
    for group, (part, node) in results:
        if nodes is not None and executor == "ray":
            nodes.add(node)
        best = merge_topk([best, part], settings.depth)
        done_codes += sum(s.rows for s in group)
        rate = done_codes / max(progress.elapsed(), 1e-9)
        progress.update(len(group), extra=f"{done_codes} codes, {rate:,.0f} codes/s")
    return best
