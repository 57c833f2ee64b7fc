"""The scan: one task's work over its group of code shards, the fan-out over all groups, and
how many codes a task gets.

A task (``scan_shards``) scores its shards in turn (``kernels.topk``), merging as it goes;
a reader thread reads and decodes the next shard while the kernel scores the current one, so
reading (an S3 GET above all) hides behind scoring and a task holds at most two shards. With
a ``Rescorer`` it then attaches the re-rank score of its top rows (``rerank.attach_exact``).
The kernel is chosen per call (``kernels.choose_kernel``: the block's query count and K), so
a last block of a few queries may use another kernel than the full ones; each task reports
the one it used and its phase times (``account.TaskClock``). ``scan_gallery`` runs one task
per group through ``pipelines.execution.run_tasks`` (Ray tasks spread over the nodes, the
block's query tables, tombstones and rescorer put in the object store once per block, at
most ``max_in_flight`` submitted at once, or in this process) and merges the tasks' top-k as
they arrive, so the driver holds only the tasks in flight and the running top-k. A fresh Ray
worker spends seconds importing torch before its first task; ``warm_workers`` has that done
while the driver reads and embeds the first block of queries, and the first block's scan
waits for it, so its tasks find a worker ready on every node (``SPREAD`` then uses them all
rather than the first node whose workers came up).

``task_count`` sizes the tasks: from the codes' bytes (manifest sizes) and the block's query
count it estimates a code's seconds (read + score), then gives a task ``task_seconds`` of
work, or less where the gallery would otherwise not give every task slot two tasks (never
below a tenth of ``task_seconds``), in whole rounds over the slots, and
``topk.split_shards`` cuts the gallery into that many runs of about equal codes. Per-task
costs (dispatch, the driver's merge of a task's nq x k rows) then stay small against the
task, and every slot gets work until about the end.
"""
from __future__ import annotations

import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from pipelines.execution import node_id, run_tasks
from pipelines.progress import Progress
from pipelines.query.account import ScanAccount, TaskClock
from pipelines.query.kernels import choose_kernel
from pipelines.query.kernels import topk as kernel_topk
from pipelines.query.rerank import Rescorer, attach_exact
from pipelines.query.topk import ShardTask, empty_topk, merge_topk, read_shard, topk_table

# Per-CPU rates for sizing tasks (not for results): the batched kernel's scores/s on one
# thread (docs/results.md, Query: 1.29 G at K = 256 measured; taken lower for a busy node)
# and the code-shard bytes/s one task reads and decodes (Parquet + zstd, local disk or S3).
SCORES_PER_S = 1.0e9
READ_BYTES_PER_S = 100e6
# Codes per kernel call: the kernel's running top-k threshold starts afresh with each call, and
# a call of 100k codes ran at a third of the rate of one of 2M (64 queries, 1 thread), so small
# shards are scored together (their codes concatenated in order; rows map back to their shard).
SCORE_ROWS = 2_000_000


@dataclass(frozen=True)
class ScanSettings:
    """What every scan task of a query shares besides the tables, tombstones and rescorer."""

    depth: int  # rows kept per query: top_k, or R when re-ranking
    kernel: str = "auto"
    storage_options: dict | None = None
    threads: int = 0  # torch/faiss threads of a task; 0 leaves the process's setting (in-process runs)


def task_count(codes: int, code_bytes: float, queries: int, slots: int, task_seconds: float) -> int:
    """Scan tasks for a gallery of ``codes`` codes taking ``code_bytes`` bytes each in storage,
    ``queries`` queries a block and ``slots`` tasks at once (see the module docstring): a
    whole number of rounds over the slots."""
    if codes < 1:
        return 1
    seconds_per_code = max(queries, 1) / SCORES_PER_S + code_bytes / READ_BYTES_PER_S
    longest = task_seconds / seconds_per_code  # codes in a task of task_seconds
    tasks = max(-(-codes // int(max(longest, 1))), min(2 * slots, int(10 * codes / longest)))
    return max(1, -(-tasks // slots) * slots if tasks > slots else tasks)


def score_batches(shards: list[ShardTask]) -> list[list[ShardTask]]:
    """Consecutive shards in batches of at least ``SCORE_ROWS`` codes (the last one less): one
    kernel call each."""
    batches: list[list[ShardTask]] = [[]]
    rows = 0
    for shard in shards:
        if rows >= SCORE_ROWS:
            batches.append([])
            rows = 0
        batches[-1].append(shard)
        rows += shard.rows
    return batches if shards else []


def scan_shards(tables: np.ndarray, shards: list[ShardTask], k: int, deleted: pa.Array | None = None,
                kernel: str = "auto", storage_options: dict | None = None, threads: int = 0,
                rescorer: Rescorer | None = None, clock: TaskClock | None = None) -> pa.Table:
    """One task's work: each shard in turn, the next one read while this one is scored, merged
    as it goes; phase seconds go to ``clock``.

    With a ``rescorer`` the task's top-k rows also get their re-rank score (column ``exact``),
    from the shards' paired feature or refine files."""
    if threads:
        import faiss
        import torch

        torch.set_num_threads(threads)
        faiss.omp_set_num_threads(threads)
    clock = clock or TaskClock("local")
    clock.kernel = choose_kernel(kernel, len(tables), tables.shape[2])
    M = tables.shape[1]

    def read(batch):
        t = time.perf_counter()
        parts = [read_shard(shard, M, deleted, storage_options) for shard in batch]
        return parts, time.perf_counter() - t

    batches = score_batches(shards)
    best = empty_topk()
    with ThreadPoolExecutor(1) as reader:
        ahead = reader.submit(read, batches[0]) if batches else None
        for i in range(len(batches)):
            t = time.perf_counter()
            parts, read_s = ahead.result()
            clock.read_wait_s += time.perf_counter() - t
            clock.read_s += read_s
            ahead = reader.submit(read, batches[i + 1]) if i + 1 < len(batches) else None
            t = time.perf_counter()
            codes = parts[0].codes if len(parts) == 1 else np.concatenate([p.codes for p in parts])
            scores, local = kernel_topk(tables, codes, k, clock.kernel)
            clock.score_s += time.perf_counter() - t
            t = time.perf_counter()
            best = merge_topk([best, topk_table(parts, scores, local)], k)
            clock.merge_s += time.perf_counter() - t
            del parts, codes
    if rescorer is not None:
        t = time.perf_counter()
        best = attach_exact(best, shards, rescorer, storage_options)
        clock.rescore_s += time.perf_counter() - t
    return best


def scan_task(group: list[ShardTask], tables: np.ndarray, deleted: pa.Array, rescorer: Rescorer | None,
              settings: ScanSettings) -> tuple[pa.Table, TaskClock]:
    """``scan_shards`` of one group, with its clock (the node it ran on: "local" in this process)."""
    clock = TaskClock(node_id())
    best = scan_shards(tables, group, settings.depth, deleted, settings.kernel, settings.storage_options,
                       settings.threads, rescorer, clock)
    return best, clock.stop()


def warm_task(item: int) -> tuple[str, int]:
    """The imports of a scan task (torch with this module, faiss) and one tiny kernel call:
    seconds in a fresh Ray worker, paid here while the driver reads and embeds the first queries."""
    import faiss  # noqa: F401

    kernel_topk(np.ones((4, 2, 16), np.float32), np.zeros((64, 2), np.uint8), 1, "torch")
    return node_id(), os.getpid()


def warm_workers(slots: int, cpus_per_task: float, gpus_per_task: float, account: ScanAccount) -> Future:
    """Start ``slots`` Ray workers and their imports in the background (one ``warm_task`` each,
    spread over the nodes); the seconds it took go to ``account`` as ``warmup_s``."""
    def run():
        t = time.perf_counter()
        for _ in run_tasks(warm_task, range(slots), num_cpus=cpus_per_task, num_gpus=gpus_per_task, spread=True):
            pass
        account.add("warmup_s", time.perf_counter() - t)

    pool = ThreadPoolExecutor(1, thread_name_prefix="warm-workers")
    future = pool.submit(run)
    pool.shutdown(wait=False)
    return future


def scan_gallery(tables: np.ndarray, groups: list[list[ShardTask]], deleted: pa.Array, settings: ScanSettings,
                 progress: Progress, *, executor: str = "ray", max_in_flight: int = 0, cpus_per_task: float = 1,
                 gpus_per_task: float = 0, account: ScanAccount | None = None,
                 rescorer: Rescorer | None = None) -> pa.Table:
    """The global top-``settings.depth`` table of every group's ``scan_task`` (with the ``exact``
    column when a ``rescorer`` is given); the tasks' clocks and the driver's merge time go to
    ``account`` (one block: ``account.end_block`` closes its window)."""
    account = account if account is not None else ScanAccount()
    best = empty_topk()
    done_codes = 0
    start = time.time()
    # SPREAD: scans are I/O + memory bound, so use every node's bandwidth rather than packing
    results = run_tasks(scan_task, groups, shared=(tables, deleted, rescorer, settings), executor=executor,
                        max_in_flight=max_in_flight or None, num_cpus=cpus_per_task, num_gpus=gpus_per_task,
                        spread=True)
    for group, (part, clock) in results:
        account.add_task(clock)
        t = time.perf_counter()
        best = merge_topk([best, part], settings.depth)
        account.add("driver_merge_s", time.perf_counter() - t)
        done_codes += sum(s.rows for s in group)
        rate = done_codes / max(progress.elapsed(), 1e-9)
        progress.update(len(group), extra=f"{done_codes} codes, {rate:,.0f} codes/s")
    account.end_block(start, time.time())
    return best
