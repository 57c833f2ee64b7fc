"""Progress lines for long jobs: count / total, rate, ETA, then one summary line."""
from __future__ import annotations

import sys
import time


def format_seconds(seconds: float) -> str:
    seconds = max(0, int(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


class Progress:
    """Prints at most every ``interval`` seconds (and at the end) so logs stay readable."""

    def __init__(self, total: int, unit: str, label: str, interval: float = 5.0, stream=None):
        self.total, self.unit, self.label, self.interval = total, unit, label, interval
        self.stream = stream or sys.stderr
        self.done = 0
        self.start = time.monotonic()
        self._last = 0.0

    def update(self, n: int = 1, extra: str = "") -> None:
        self.done += n
        now = time.monotonic()
        if now - self._last >= self.interval or self.done >= self.total:
            self._last = now
            print(self.line(extra), file=self.stream, flush=True)

    def rate(self) -> float:
        return self.done / max(time.monotonic() - self.start, 1e-9)

    def line(self, extra: str = "") -> str:
        rate = self.rate()
        eta = (self.total - self.done) / rate if rate > 0 else float("inf")
        eta_s = format_seconds(eta) if eta != float("inf") else "?"
        pct = 100.0 * self.done / self.total if self.total else 100.0
        tail = f" {extra}" if extra else ""
        return f"[{self.label}] {self.done}/{self.total} {self.unit} ({pct:.0f}%) {rate:.1f} {self.unit}/s ETA {eta_s}{tail}"

    def elapsed(self) -> float:
        return time.monotonic() - self.start
