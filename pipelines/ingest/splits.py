"""Retrieval splits, decided from ids and a seed only (no randomness state, no run order).

- single-domain protocol (``single``): within each identity, photos are ranked by
  ``hash(seed, photo id)``; the first ``round(query_fraction * n)`` are ``query`` (at least one
  when the identity has 2+ photos and the fraction is > 0, never all of them), the rest
  ``database``. Photos without an identity are ``database``.
- cross-domain protocol (``cross``): an identity is ``unseen`` (held out from training,
  used for retrieval of never-seen people) when ``hash(seed, identity) < unseen_fraction``,
  otherwise ``train`` (the trainer's default training splits are ``database`` and ``train``). A threshold, not a rank, so adding identities never moves old ones.

The photo id is the photo's content hash, so renaming or moving a file keeps its split.
On an incremental run the ranks are recomputed over all photos known so far and applied to
the new photos only; rows already written keep the split they were written with.
"""
from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Iterable

QUERY, DATABASE, TRAIN, UNSEEN = "query", "database", "train", "unseen"


def unit_hash(seed: int, key: str) -> float:
    """A number in [0, 1) fixed by ``seed`` and ``key``."""
    digest = hashlib.sha256(f"{seed}\0{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0 ** 64


def query_count(n: int, fraction: float) -> int:
    if n < 2 or fraction <= 0:
        return 0
    return min(n - 1, max(1, round(fraction * n)))


def single_domain(photos: Iterable[tuple[str | None, str]], query_fraction: float, seed: int) -> dict[str, str]:
    """``{photo id: query|database}`` for ``(identity, photo id)`` pairs."""
    groups: dict[str, list[str]] = defaultdict(list)
    out: dict[str, str] = {}
    for identity, photo in photos:
        if identity is None:
            out[photo] = DATABASE
        else:
            groups[identity].append(photo)
    for identity, members in groups.items():
        ranked = sorted(set(members), key=lambda p: (unit_hash(seed, p), p))
        k = query_count(len(ranked), query_fraction)
        for i, photo in enumerate(ranked):
            out[photo] = QUERY if i < k else DATABASE
    return out


def cross_domain(photos: Iterable[tuple[str | None, str]], unseen_fraction: float, seed: int) -> dict[str, str]:
    """``{photo id: train|unseen}``: whole identities are held out. No identity -> ``train``."""
    out = {}
    for identity, photo in photos:
        held_out = identity is not None and unit_hash(seed, "identity:" + identity) < unseen_fraction
        out[photo] = UNSEEN if held_out else TRAIN
    return out


def assign(photos: list[tuple[str | None, str]], protocol: str, query_fraction: float,
           unseen_fraction: float, seed: int) -> dict[str, str]:
    if protocol == "single":
        return single_domain(photos, query_fraction, seed)
    if protocol == "cross":
        return cross_domain(photos, unseen_fraction, seed)
    raise ValueError(f"unknown split protocol {protocol!r} (want 'single' or 'cross')")
