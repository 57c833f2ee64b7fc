"""Where a query's scan time goes: per-phase seconds from the scan tasks' own clocks.

Each scan task (``scan.scan_shards``) times its phases and returns them with its worker
process, node and wall-clock start and end (``TaskClock``). ``ScanAccount`` adds them up
over the tasks and blocks of a job, with what only the driver sees (its merge of the tasks'
top-k, the query embedding done while the previous block is scanned, each block's scan
window, the workers' warm-up beside the driver's own work and how long the first block's
scan waited for it), and splits the time the workers spent outside task code into:

- ``startup_s``: per worker and block, from the block's start to the worker's first task
  (Ray starting the worker process and importing torch/faiss, fetching the query tables from
  the object store, the first dispatch);
- ``dispatch_s``: gaps between consecutive tasks of one worker (scheduling, argument fetch,
  returning the result);
- ``tail_s``: from a worker's last task to the block's end (idle while others finish).

Task phases are summed over tasks, so with several workers in parallel they add up to more
than the wall time; ``task_s`` is their sum of task wall times and ``task_cpu_s`` the worker
processes' CPU seconds in those tasks (below ``task_s`` when the CPUs are shared). Clocks of
different nodes are compared as they are (``time.time()``), so on a real cluster ``startup_s``
and ``tail_s`` carry the nodes' clock skew.
"""
from __future__ import annotations

import os
import time
from collections import Counter
from dataclasses import dataclass, field

TASK_PHASES = ("read_s", "read_wait_s", "score_s", "merge_s", "rescore_s")


@dataclass
class TaskClock:
    """One scan task's timings (seconds) and where it ran."""

    node: str
    kernel: str = ""
    pid: int = field(default_factory=os.getpid)
    start: float = field(default_factory=time.time)
    end: float = 0.0
    cpu_s: float = 0.0
    read_s: float = 0.0  # reading + decoding code shards (in the task's reader thread)
    read_wait_s: float = 0.0  # the scoring loop waiting for a read (reading not hidden by scoring)
    score_s: float = 0.0  # the kernel
    merge_s: float = 0.0  # the task's top-k tables and their merge
    rescore_s: float = 0.0  # re-rank scores of the task's candidates
    _cpu0: float = field(default_factory=time.process_time, repr=False)

    def stop(self) -> TaskClock:
        self.end = time.time()
        self.cpu_s = time.process_time() - self._cpu0
        return self


@dataclass
class ScanAccount:
    """Phase seconds of a whole query job (see the module docstring); ``to_dict`` for the summary."""

    phases: dict = field(default_factory=lambda: dict.fromkeys(
        TASK_PHASES + ("task_s", "task_cpu_s", "startup_s", "dispatch_s", "tail_s", "driver_merge_s", "embed_s",
                       "warmup_s", "warmup_wait_s", "scan_wall_s"), 0.0))
    tasks: int = 0
    workers: set = field(default_factory=set)
    node_tasks: Counter = field(default_factory=Counter)
    kernels: set = field(default_factory=set)
    _block: list = field(default_factory=list)

    def add_task(self, clock: TaskClock) -> None:
        for name in TASK_PHASES:
            self.phases[name] += getattr(clock, name)
        self.phases["task_s"] += clock.end - clock.start
        self.phases["task_cpu_s"] += clock.cpu_s
        self.tasks += 1
        self.workers.add((clock.node, clock.pid))
        self.node_tasks[clock.node] += 1
        if clock.kernel:
            self.kernels.add(clock.kernel)
        self._block.append(clock)

    def add(self, name: str, seconds: float) -> None:
        self.phases[name] += seconds

    def end_block(self, start: float, end: float) -> None:
        """Close one block's scan window (wall clock ``time.time()`` at its start and end)."""
        self.phases["scan_wall_s"] += end - start
        by_worker: dict = {}
        for c in self._block:
            by_worker.setdefault((c.node, c.pid), []).append(c)
        for clocks in by_worker.values():
            clocks.sort(key=lambda c: c.start)
            self.phases["startup_s"] += max(0.0, clocks[0].start - start)
            self.phases["dispatch_s"] += sum(max(0.0, b.start - a.end) for a, b in zip(clocks, clocks[1:]))
            self.phases["tail_s"] += max(0.0, end - clocks[-1].end)
        self._block = []

    def describe(self) -> str:
        """One line: the phases in task seconds (summed over tasks) and the driver's own."""
        p = self.phases
        return (f"{self.tasks} tasks on {len(self.workers)} workers, {p['task_s']:.1f} task-s ({p['task_cpu_s']:.1f} "
                f"CPU-s): read {p['read_s']:.1f} s ({p['read_wait_s']:.1f} s not hidden by scoring), score "
                f"{p['score_s']:.1f} s, task merge {p['merge_s']:.1f} s, re-rank {p['rescore_s']:.1f} s; workers "
                f"outside tasks: start-up {p['startup_s']:.1f} s, dispatch {p['dispatch_s']:.1f} s, tail "
                f"{p['tail_s']:.1f} s; driver merge {p['driver_merge_s']:.1f} s, query embedding {p['embed_s']:.1f} s "
                f"and worker warm-up {p['warmup_s']:.1f} s (both beside the scan; the scan waited "
                f"{p['warmup_wait_s']:.1f} s for the warm-up), scan wall {p['scan_wall_s']:.1f} s")

    def to_dict(self) -> dict:
        out = {name: round(v, 3) for name, v in self.phases.items()}
        out.update(tasks=self.tasks, workers=len(self.workers), node_tasks=dict(self.node_tasks),
                   kernels=sorted(self.kernels))
        return out
