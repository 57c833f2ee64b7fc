"""Query scale: peak memory against the number of queries, and the end-to-end scan rate against the kernel.

Setup (kept under ``--workdir`` and reused): a small random-weight OPQN checkpoint (M = 4,
K = 256), a synthetic gallery of ``--codes`` codes in shards of ``--shard-rows`` that it
"encoded", and a synthetic query face dataset of ``max(--queries)`` faces (a pool of 64 noise
crops, PNG, cycled under distinct face ids: decoding and embedding cost as for real crops).

1. ``kernel_scores_per_s``: ``pipelines.query.kernels.topk`` on one thread, the batched kernel
   (64 queries, top-k) over up to 1M of the gallery's codes, best of 3.
2. For each query count in ``--queries``: a fresh Python process runs ``query_batch`` (Ray
   in-process, one task slot per CPU) into a results dataset, with ``--memory-mb`` (or
   ``--query-block``) fixing the block size, while ``benchmarks.memory.PeakMemory`` samples
   its whole process tree (driver, Ray's processes and workers). Reported: peak summed RSS and
   PSS of the tree, and the scan's scores/s (queries x codes / scan seconds, the embedding of
   the queries left out, as ``opqn query`` reports it).
3. ``efficiency`` = end-to-end scores/s / (kernel scores/s x CPUs used), at the largest query
   count; ``memory_ratio`` = tree peak at the largest query count / at the smallest.

Ends with one JSON line holding at least codes, queries, peak_rss_mb, scores_per_s,
kernel_scores_per_s, efficiency. The machine may be shared: numbers from a loaded machine
are not targets met; re-run on a quiet one.
    nice .venv/bin/python benchmarks/query_scale.py --codes 200000 --queries 1000,10000
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

M, K, D = 4, 256, 1024


def cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def make_checkpoint(url: str) -> str:
    import torch

    from model.opqn import OPQN, OPQNConfig
    from pipelines.formats.checkpoint import load_checkpoint, save_checkpoint, training_state
    from pipelines.train.recipe import Recipe, make_optimizer

    torch.manual_seed(0)
    model = OPQN(OPQNConfig(num_classes=4, M=M, K=K, D=D, image_size=32, width=0.125))
    opt, sched = make_optimizer(model, Recipe())
    save_checkpoint(url, training_state(model, opt, sched, epoch=1, history=[], classes=list("abcd"),
                                        train={"enlarge": 1.1}))
    return load_checkpoint(url)["model_id"]


def write_query_faces(root: Path, n: int, size: int = 40, per_shard: int = 20_000) -> None:
    """``n`` faces of split "query" in shards of ``per_shard`` rows (a pool of 64 noise crops)."""
    from encode import synthetic_dataset

    synthetic_dataset(root, n, size, per_shard, split="query", pool_size=64, prefix="q")


def kernel_rate(gallery: str, k: int, queries: int = 64, max_codes: int = 1_000_000) -> float:
    """Single-thread scores/s of the batched kernel over the gallery's first codes, best of 3."""
    import faiss
    import torch

    from pipelines.formats.gallery import read_codes, require_gallery
    from pipelines.query import kernels as kn

    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    parts, n = [], 0
    for url in require_gallery(gallery).shard_urls():
        parts.append(read_codes(url, M)[1])
        n += len(parts[-1])
        if n >= max_codes:
            break
    codes = np.concatenate(parts)[:max_codes]
    rng = np.random.default_rng(1)
    t = np.exp(3 * rng.standard_normal((queries, M, K)))
    tables = (t / t.sum(-1, keepdims=True)).astype(np.float32)
    kn.topk(tables[:4], codes[:10_000], k)  # warm up
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        kn.topk(tables, codes, k, kernel="torch")
        best = min(best, time.perf_counter() - t0)
    return queries * len(codes) / best


def run_one(args) -> None:
    """Child process: one query job under PeakMemory; prints one JSON line."""
    from memory import PeakMemory
    from pipelines.query.run import QueryConfig, query_batch

    cfg = QueryConfig(top_k=args.top_k, rows_per_task=args.rows_per_task, query_block=args.query_block,
                      memory_mb=args.memory_mb, progress_interval=30.0)
    with PeakMemory() as peak:
        summary = query_batch(args.model, args.gallery, args.query_set, args.results, cfg)
    print(json.dumps({"queries": summary["queries"], "blocks": summary["blocks"], "tasks": summary["tasks"],
                      "scan_seconds": summary["scan_seconds"], "seconds": summary["seconds"],
                      "scores_per_s": summary["scores_per_s"], "peak_rss_mb": round(peak.tree_rss / 2**20),
                      "peak_pss_mb": round(peak.tree_pss / 2**20), "median_late_pss_mb":
                      round(peak.median_late() / 2**20), "driver_rss_mb": round(peak.driver_rss / 2**20)}))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--codes", type=int, default=200_000)
    p.add_argument("--queries", default="1000,10000", help="comma-separated query counts, smallest first")
    p.add_argument("--top-k", type=int, default=100)
    p.add_argument("--shard-rows", type=int, default=100_000)
    p.add_argument("--rows-per-task", type=int, default=0, help="codes per scan task (0: --shard-rows)")
    p.add_argument("--memory-mb", type=int, default=256)
    p.add_argument("--query-block", type=int, default=0)
    p.add_argument("--workdir", default="", help="keep the synthetic data here (reused when present)")
    p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--gallery", help=argparse.SUPPRESS)
    p.add_argument("--query-set", dest="query_set", help=argparse.SUPPRESS)
    p.add_argument("--results", dest="results", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.rows_per_task = args.rows_per_task or args.shard_rows
    if args.one:
        run_one(args)
        return 0

    from query_scan import write_synthetic_gallery

    counts = [int(x) for x in args.queries.split(",") if x]
    work = Path(args.workdir or tempfile.mkdtemp(prefix="opqn-query-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    model = str(work / "model.pt")
    model_id = make_checkpoint(model)
    gallery = str(work / f"gallery-{args.codes}")
    if not (Path(gallery) / "manifest.json").exists():
        write_synthetic_gallery(gallery, model_id, D, M, K, args.codes, args.shard_rows)
    kernel = kernel_rate(gallery, args.top_k)
    print(f"kernel (torch, 1 thread, 64 queries, top-{args.top_k}): {kernel / 1e6:,.0f} M scores/s", flush=True)
    runs = []
    for n in counts:
        results = work / f"results-{n}-{time.time_ns()}"
        query_set = work / f"queries-{n}"
        if not query_set.exists():
            write_query_faces(query_set, n)
        cmd = [sys.executable, __file__, "--one", "--model", model, "--gallery", gallery, "--query-set",
               str(query_set), "--results", str(results), "--top-k", str(args.top_k), "--rows-per-task",
               str(args.rows_per_task), "--memory-mb", str(args.memory_mb), "--query-block", str(args.query_block)]
        out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
        if out.returncode:
            raise SystemExit(f"query job failed:\n{out.stderr[-3000:]}")
        run = json.loads(out.stdout.strip().splitlines()[-1])
        runs.append(run)
        print(f"{run['queries']} queries x {args.codes} codes: {run['blocks']} blocks, scan {run['scan_seconds']} s "
              f"= {run['scores_per_s'] / 1e6:,.0f} M scores/s; peak tree RSS {run['peak_rss_mb']} MB, PSS "
              f"{run['peak_pss_mb']} MB (driver {run['driver_rss_mb']} MB)", flush=True)
    last, first = runs[-1], runs[0]
    result = {"codes": args.codes, "queries": last["queries"], "peak_rss_mb": last["peak_rss_mb"],
              "scores_per_s": last["scores_per_s"], "kernel_scores_per_s": kernel,
              "efficiency": last["scores_per_s"] / (kernel * cpus()), "cpus": cpus(),
              "memory_ratio_rss": last["peak_rss_mb"] / max(first["peak_rss_mb"], 1),
              "memory_ratio_pss": last["peak_pss_mb"] / max(first["peak_pss_mb"], 1),
              "top_k": args.top_k, "memory_mb": args.memory_mb, "query_block": args.query_block, "runs": runs}
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
