"""Progress lines for long jobs: count / total, rate, ETA, then one summary line.

Progress lines, and the other lines a stage hands to ``say``, are log records of a logger
per stage under ``opqn`` (``opqn.prepare``, ``opqn.train``, ``opqn.encode``, ``opqn.query``, ``opqn.pipeline``),
so they can be filtered (``logging.getLogger("opqn.train").setLevel(logging.WARNING)``) or
sent elsewhere like any log. By default ``opqn`` writes each message as it is, with
``print``, to the stream the stage was given (stdout or stderr, the command decides): the
console looks the same as plain prints, and Prefect's ``log_prints`` still records them.
"""
from __future__ import annotations

import logging
import sys
import time

CONSOLE = "opqn"


class _StageStream(logging.Handler):
    """Prints a record's message to the stream it names (``extra={"opqn_stream": out}``), or
    stderr; the stream is looked up when the line is written (pytest swaps sys.stderr)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            print(self.format(record), file=getattr(record, "opqn_stream", None) or sys.stderr, flush=True)
        except Exception:  # noqa: BLE001 - logging's contract: a handler never raises
            self.handleError(record)


def _console_logger() -> logging.Logger:
    logger = logging.getLogger(CONSOLE)
    if not any(isinstance(h, _StageStream) for h in logger.handlers):
        logger.addHandler(_StageStream())
        logger.setLevel(logging.INFO)
        # the root handler (`opqn --verbose`) would print every line a second time, prefixed
        logger.propagate = False
    return logger


_console_logger()


def stage_logger(stage: str) -> logging.Logger:
    """The progress logger of a stage: ``opqn.<stage>`` ("query 2/3" -> ``opqn.query``)."""
    return logging.getLogger(f"{CONSOLE}.{stage.split()[0]}")


def say(stage: str, message: str, out=None, level: int = logging.INFO) -> None:
    """One progress or summary line of ``stage``, to ``out`` (default stderr) through logging."""
    stage_logger(stage).log(level, message, extra={"opqn_stream": out})


def format_seconds(seconds: float) -> str:
    seconds = max(0, int(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


class Progress:
    """Prints at most every ``interval`` seconds (and at the end) so logs stay readable."""

    def __init__(self, total: int, unit: str, label: str, interval: float = 5.0, stream=None):
        self.total, self.unit, self.label, self.interval = total, unit, label, interval
        self.stream = stream
        self.done = 0
        self.start = time.monotonic()
        self._last = 0.0

    def update(self, n: int = 1, extra: str = "") -> None:
        self.done += n
        now = time.monotonic()
        if now - self._last >= self.interval or self.done >= self.total:
            self._last = now
            say(self.label, self.line(extra), self.stream)

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
