"""Manifest commit cost against the number of shards already listed (storage level, local disk).

Every commit reads, parses, changes, serialises and swaps the whole manifest, so one commit
costs time linear in the files already listed, and one commit per shard makes an ingest of S
shards quadratic. This measures ``storage.manifest.commit`` the way ingest uses it: one commit
per shard listing three files (faces/, rejects/, sources/ entries; the files themselves are not
written, ``check_added`` is off) and setting the ingest metadata, into a fresh local dataset.
It prints the mean time of the commits around the 20th and around the last (``--shards``),
their ratio (against the ratio of listed files), and the total; then the same shards committed
``--group`` at a time (one manifest swap per group) for the total a grouped ingest would pay.
The last line is JSON.

    .venv/bin/python benchmarks/commit_scale.py [--shards 2000] [--group 20] [--window 20]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from storage.manifest import Delta, FileEntry, commit  # noqa: E402

METADATA = {"ingest": {"format": "opqn-faces", "version": 1, "config": {"size": 112, "margin": 0.0}}}


def shard_entries(i: int) -> tuple[FileEntry, ...]:
    """The three files one ingest shard lists (names and sizes like real ones)."""
    sha = hashlib.sha256(str(i).encode()).hexdigest()
    return tuple(FileEntry(path=f"{d}/part-20261202T120000-{i:016x}.parquet", rows=rows, size=size, sha256=sha)
                 for d, rows, size in (("faces", 64, 1_200_000), ("rejects", 1, 2_000), ("sources", 64, 9_000)))


def commit_times(root: str, shards: int, group: int) -> list[float]:
    """Seconds of each commit of ``shards`` shards, ``group`` shards per commit."""
    out = []
    for start in range(0, shards, group):
        entries = tuple(e for i in range(start, min(start + group, shards)) for e in shard_entries(i))
        t0 = time.perf_counter()
        commit(root, Delta(add=entries, metadata=METADATA), check_added=False)
        out.append(time.perf_counter() - t0)
    return out


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shards", type=int, default=2000)
    p.add_argument("--group", type=int, default=20, help="shards per commit in the grouped run")
    p.add_argument("--window", type=int, default=20, help="commits averaged around the 20th and the last")
    args = p.parse_args(argv)
    if args.shards < 40 or args.window < 1 or args.group < 1:
        p.error("--shards must be >= 40, --window and --group >= 1")
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        per_shard = commit_times(f"{tmp}/one-per-shard", args.shards, 1)
        total = time.perf_counter() - t0
        t0 = time.perf_counter()
        grouped = commit_times(f"{tmp}/grouped", args.shards, args.group)
        grouped_total = time.perf_counter() - t0
    half = args.window // 2
    early = per_shard[max(0, 19 - half):19 - half + args.window]
    late = per_shard[-args.window:]
    result = {"shards": args.shards, "commit_s_at_20": mean(early), f"commit_s_at_{args.shards}": mean(late),
              "ratio": mean(late) / mean(early), "listed_files_ratio": args.shards / 20,
              "total_s_one_commit_per_shard": total, "group": args.group, "commits_grouped": len(grouped),
              "total_s_grouped": grouped_total, "total_ratio": total / grouped_total}
    print(f"one commit per shard: commit {20} {mean(early) * 1e3:.2f} ms, commit {args.shards} "
          f"{mean(late) * 1e3:.2f} ms (x{result['ratio']:.1f}; listed files x{args.shards / 20:.0f}), "
          f"{args.shards} commits {total:.1f} s")
    print(f"{args.group} shards per commit: {len(grouped)} commits {grouped_total:.1f} s "
          f"({result['total_ratio']:.1f}x less)")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
