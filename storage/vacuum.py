"""Vacuum: delete the files of a dataset or gallery that its manifest no longer lists.

Commits never delete: a compaction or a rewrite unlists the old files, and a crashed writer
leaves files it never listed, because a reader of the previous manifest (a query that started
a moment earlier) may still be reading them. So bytes a manifest dropped stay on storage until
``vacuum`` removes them: it holds the root's writer lease (storage.lease; no writer is running
meanwhile) and deletes every unlisted file older than ``older_than`` seconds (the longest a
reader may keep an old manifest) and older than the lease itself.
"""
from __future__ import annotations

import logging

from . import files, lease
from .manifest import file_url

log = logging.getLogger(__name__)

DEFAULT_OLDER_THAN = 3600.0  # seconds an unlisted file is kept for readers of an older manifest


def vacuum(root: str, older_than: float = DEFAULT_OLDER_THAN, storage_options: dict | None = None,
           command: str | None = None) -> list[str]:
    """Delete the unlisted files under ``root`` older than ``older_than`` seconds; returns their paths."""
    if older_than < 0:
        raise ValueError(f"older_than must be >= 0 seconds, got {older_than}")
    with lease.held(root, command or f"opqn vacuum {root}", storage_options=storage_options):
        gone = lease.sweepable_orphans(root, storage_options, older_than)
        for rel in gone:
            files.delete(file_url(root, rel), storage_options)
            log.info("vacuum: deleted %s", file_url(root, rel))
    return gone
