"""Peak memory of a benchmark: this process alone and its whole process tree (Ray workers).

The tree is summed by PSS as well as RSS: every Ray process maps the shared object store,
so summed RSS counts the same shared pages once per process and grows with how much of
the store each one has touched; PSS splits shared pages between the processes using them.
"""
from __future__ import annotations

import threading

import psutil


def _smaps_rollup(pid: int) -> dict[str, int]:
    """Rss, Pss and Pss_Anon / Pss_Shmem / Pss_File of a process in bytes (Linux >= 5.x), from
    one read: psutil's ``memory_full_info`` reads the same file for Pss alone."""
    out = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("Rss", "Pss", "Pss_Anon", "Pss_Shmem", "Pss_File"):
                out[key] = int(value.split()[0]) * 1024
    return out


class PeakMemory:
    def __init__(self, interval: float = 0.2):
        self.interval = interval
        self.driver_rss = self.tree_rss = self.tree_pss = 0
        self.by_process: dict[str, int] = {}  # peak PSS per process title, to see what grows
        # the tree's PSS split at its peak: private heap vs shared memory (the object store)
        self.tree_pss_parts: dict[str, int] = {}
        self.samples: list[int] = []  # the tree's PSS at every sample, to tell a plateau from a climb
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def median_late(self) -> int:
        """Median tree PSS over the second half of the samples: the steady state, without the
        single worst moment that the peak records (which a longer run is likelier to catch)."""
        late = sorted(self.samples[len(self.samples) // 2:]) or [0]
        return late[len(late) // 2]

    @property
    def peak(self) -> int:
        """Summed RSS of the tree (the figure earlier results quote as peak RSS)."""
        return self.tree_rss

    def _sample(self) -> None:
        me = psutil.Process()
        rss = pss = 0
        parts = {"anon": 0, "shmem": 0, "file": 0}
        for p in [me, *me.children(recursive=True)]:
            try:
                info = _smaps_rollup(p.pid)
            except OSError:  # the process has exited
                continue
            rss += info["Rss"]
            pss += info["Pss"]
            for name in parts:
                parts[name] += info.get(f"Pss_{name.capitalize()}", 0)
            try:
                title = " ".join(p.cmdline()[:1])[:60] or p.name()
            except psutil.Error:
                title = "?"
            key = f"{title} [{p.pid}]"
            self.by_process[key] = max(self.by_process.get(key, 0), info["Pss"])
        self.samples.append(pss)
        if pss > self.tree_pss:
            self.tree_pss_parts = parts
        self.tree_rss, self.tree_pss = max(self.tree_rss, rss), max(self.tree_pss, pss)
        self.driver_rss = max(self.driver_rss, me.memory_info().rss)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
