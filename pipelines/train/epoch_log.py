"""Epoch lines from the driver: rank 0's record of each epoch reaches the driver's log.

Worker output is not forwarded to the driver (``start_ray``), so the console, a Ray job's
log and a Prefect flow's log hold the job's own lines and none of Ray Train's. Rank 0 puts
each epoch's record (losses already averaged over all ranks) on a queue right after it has
written that epoch's checkpoint, so every checkpointed epoch gets its line, also when a
worker dies before the epoch is reported to Ray Train; a resumed worker group says where it
resumed. A thread of the driver turns each item into one line on the ``opqn.train`` logger
(pipelines/progress.py), in the caller's context, so Prefect's ``log_prints`` records it.
"""
from __future__ import annotations

import contextlib
import contextvars
import threading
from collections.abc import Iterator

from pipelines.progress import format_seconds, say


def epoch_line(record: dict, total: int, eta_seconds: float | None) -> str:
    eta = f" ETA {format_seconds(eta_seconds)}" if eta_seconds is not None else ""
    return ("[train] epoch {epoch}/{total} loss {loss:.4f} clf_x {clf_x:.4f} clf_s {clf_s:.4f} entropy {entropy:.4f} "
            "acc {acc:.3f} {samples_per_s:.1f} samples/s").format(total=total, **record) + eta


class _EpochLines:
    """Turns feed items into lines: ``("resume", epoch)`` and ``("epoch", record)``."""

    def __init__(self, total: int, model_url: str, out):
        self.total, self.model_url, self.out = total, model_url, out
        self.epoch_seconds: list[float] = []

    def __call__(self, item: tuple) -> None:
        kind, payload = item
        if kind == "resume":
            say("train", f"resuming {self.model_url} at epoch {payload}/{self.total}", self.out)
            return
        self.epoch_seconds.append(payload["epoch_seconds"])
        left = self.total - payload["epoch"]
        eta = left * sum(self.epoch_seconds) / len(self.epoch_seconds) if left else None
        say("train", epoch_line(payload, self.total, eta), self.out)


def _drain(queue, show: _EpochLines, done: threading.Event) -> None:
    from ray.util.queue import Empty

    while True:
        try:
            show(queue.get(timeout=0.5))
        except Empty:
            if done.is_set():
                return
        except Exception:  # noqa: BLE001 - the queue actor is gone (Ray shut down): no more lines
            return


@contextlib.contextmanager
def epoch_feed(total: int, model_url: str, out) -> Iterator:
    """Yields the queue rank 0 feeds (hand it to the workers); logs its items while the body runs
    and every item still queued when it ends."""
    from ray.util.queue import Queue

    queue = Queue(actor_options={"num_cpus": 0})
    done = threading.Event()
    drain = threading.Thread(target=contextvars.copy_context().run, args=(_drain, queue, _EpochLines(
        total, model_url, out), done), name="opqn-epoch-lines", daemon=True)
    drain.start()
    try:
        yield queue
    finally:
        done.set()
        drain.join(timeout=10)
        queue.shutdown()


def publish(feed, kind: str, payload) -> None:
    """Called by rank 0 in a worker; ``feed`` is None where no driver listens (tests)."""
    if feed is not None:
        feed.put((kind, payload))
