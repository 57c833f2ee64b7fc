"""Peak memory of a benchmark: this process alone and its whole process tree (Ray workers).

The tree is summed by PSS as well as RSS: every Ray process maps the shared object store,
so summed RSS counts the same shared pages once per process and grows with how much of
the store each one has touched; PSS splits shared pages between the processes using them.
"""
from __future__ import annotations

import threading

import psutil


class PeakMemory:
    def __init__(self, interval: float = 0.2):
        self.interval = interval
        self.driver_rss = self.tree_rss = self.tree_pss = 0
        self.by_process: dict[str, int] = {}  # peak PSS per process title, to see what grows
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @property
    def peak(self) -> int:
        """Summed RSS of the tree (the figure earlier results quote as peak RSS)."""
        return self.tree_rss

    def _sample(self) -> None:
        me = psutil.Process()
        rss = pss = 0
        for p in [me, *me.children(recursive=True)]:
            try:
                info = p.memory_full_info()
            except psutil.Error:
                continue
            rss += info.rss
            pss += info.pss
            try:
                title = " ".join(p.cmdline()[:1])[:60] or p.name()
            except psutil.Error:
                title = "?"
            key = f"{title} [{p.pid}]"
            self.by_process[key] = max(self.by_process.get(key, 0), info.pss)
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
