"""Finished work listed in a manifest together: at most one commit every ``seconds``.

Every commit rewrites the manifest (and re-reads what it checks on it), so one commit per
finished shard made a dataset or gallery of many shards quadratic to write (docs/results.md,
*Data safety*). The writers (ingest's shards, encode's source shards) hand each finished item
to a ``CommitGroups`` and commit what has gathered when ``seconds`` have passed since the last
commit, and the rest at the end; a killed run redoes at most ``seconds`` of finished, unlisted
work. Before each commit the writer's lease is checked: a run whose lease was taken over
commits nothing more.
"""
from __future__ import annotations

import time
from typing import Any, Callable


class CommitGroups:
    """Items waiting to be listed; ``commit(items)`` lists them in one manifest commit."""

    def __init__(self, seconds: float, commit: Callable[[list], Any], held=None):
        self.seconds, self.commit, self.held = seconds, commit, held
        self.pending: list = []
        self.last = time.monotonic()

    def add(self, item) -> None:
        self.pending.append(item)
        self.flush()

    def flush(self, force: bool = False) -> None:
        """Commit the pending items if ``seconds`` have passed since the last commit (or ``force``)."""
        if not self.pending or (not force and time.monotonic() - self.last < self.seconds):
            return
        if self.held is not None:
            self.held.check()
        self.commit(list(self.pending))
        self.pending.clear()
        self.last = time.monotonic()
