"""Decide, before any detection, what happens to each new photo: which are duplicates, which
identities are too small, and which split each photo goes to.

These need a global view (the first copy of a photo, the size of an identity), so the driver
does them over the whole listing with the content hashes of new photos (a cheap read pass)
plus the ``sources`` records of photos processed by earlier runs. Shards then only need
their own photos.
"""
from __future__ import annotations

from collections import Counter
from concurrent.futures import ThreadPoolExecutor

from . import splits
from .config import IngestConfig
from .decode import DUPLICATE, EMPTY, TOO_FEW_PHOTOS, UNREADABLE, Rejected
from .photos import content_hash
from .sources import Source, read_source

# Earlier rows with these reasons do not count as distinct photos of an identity.
_NOT_COUNTED = {DUPLICATE, TOO_FEW_PHOTOS, UNREADABLE, EMPTY}


def hash_one(url: str, max_bytes: int, storage_options: dict | None = None) -> dict:
    """``{url, content_hash, reason, detail}``: the photo's sha256, or why it cannot be read."""
    try:
        data = read_source(url, max_bytes, storage_options)
    except Rejected as exc:
        return {"url": url, "content_hash": None, "reason": exc.reason, "detail": exc.detail}
    except (OSError, ValueError) as exc:
        return {"url": url, "content_hash": None, "reason": UNREADABLE, "detail": f"{type(exc).__name__}: {exc}"}
    if not data:
        return {"url": url, "content_hash": None, "reason": EMPTY, "detail": "zero bytes"}
    return {"url": url, "content_hash": content_hash(data), "reason": None, "detail": ""}


def hash_many(urls: list[str], max_bytes: int, storage_options: dict | None = None, threads: int = 8) -> list[dict]:
    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(lambda u: hash_one(u, max_bytes, storage_options), urls))


def plan_photos(pending: list[Source], hashes: dict[str, dict], done: list[dict], config: IngestConfig) -> list[dict]:
    """Shard items for the ``pending`` sources (sorted by URL), in that order.

    ``hashes``: ``hash_one`` results by URL for pending sources without a listing problem.
    ``done``: ``sources`` rows of earlier runs (``source, identity, content_hash, split, reason``).
    """
    first: dict[str, str] = {}
    for row in done:
        if row.get("content_hash") and row["content_hash"] not in first:
            first[row["content_hash"]] = row["source"]
    items: list[dict] = []
    for src in pending:
        item = {"source": src.url, "identity": src.identity, "split": None}
        if src.problem:
            item.update(reason=UNREADABLE, detail=src.problem)
        else:
            h = hashes[src.url]
            if h["reason"]:
                item.update(reason=h["reason"], detail=h["detail"])
            elif h["content_hash"] in first:
                item.update(reason=DUPLICATE, detail=f"same bytes as {first[h['content_hash']]}",
                            content_hash=h["content_hash"])
            else:
                first[h["content_hash"]] = src.url
                item["content_hash"] = h["content_hash"]
        items.append(item)

    # Identity sizes: distinct readable photos, earlier runs included.
    counts: Counter = Counter()
    for row in done:
        if row.get("content_hash") and row.get("reason") not in _NOT_COUNTED:
            counts[row.get("identity")] += 1
    for item in items:
        if not item.get("reason"):
            counts[item["identity"]] += 1
    for item in items:
        if item.get("reason"):
            continue
        n = counts[item["identity"]]
        if item["identity"] is None and config.min_photos > 1:
            item.update(reason=TOO_FEW_PHOTOS, detail="photo has no identity folder and min_photos > 1")
        elif n < config.min_photos:
            item.update(reason=TOO_FEW_PHOTOS, detail=f"identity {item['identity']} has {n} photos, fewer than {config.min_photos}")

    # Splits over every kept photo known so far; only the new ones receive theirs here.
    pairs = [(r.get("identity"), r["content_hash"]) for r in done
             if r.get("content_hash") and r.get("reason") not in _NOT_COUNTED]
    pairs += [(i["identity"], i["content_hash"]) for i in items if not i.get("reason")]
    assigned = splits.assign(pairs, config.protocol, config.query_fraction, config.unseen_fraction, config.seed)
    for item in items:
        if not item.get("reason"):
            item["split"] = assigned[item["content_hash"]]
    return items
