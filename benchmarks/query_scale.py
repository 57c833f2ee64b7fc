"""Query scale: peak memory against the number of queries, the end-to-end scan rate against the
kernel and where the scan's time goes, the scan on a 2-node loopback cluster, and a capacity table.

Setup (kept under ``--workdir`` and reused): a small random-weight OPQN checkpoint (M = 4,
K = 256), a synthetic gallery of ``--codes`` codes in shards of ``--shard-rows`` that it
"encoded", and a synthetic query face dataset per query count (a pool of 64 noise crops, PNG,
cycled under distinct face ids: decoding and embedding cost as for real crops).

1. Per-core rates (``per_core_rates``, one thread): the batched kernel (64 queries, top-k) over
   the gallery's first 2M codes, scores/s by wall clock and per CPU-second, best of 3; code
   shards read and decoded per CPU-second.
2. For each query count in ``--queries``: a fresh Python process runs ``query_batch`` (Ray
   in-process, one task slot per CPU, tasks sized by the job unless ``--rows-per-task``) into a
   results dataset, with ``--memory-mb`` (or ``--query-block``) fixing the block size, while
   ``benchmarks.memory.PeakMemory`` samples its whole process tree (driver, Ray's processes and
   workers). Reported: peak summed RSS and PSS of the tree, the scan's scores/s (queries x
   codes / scan seconds, the embedding of the queries left out, as ``opqn query`` reports it;
   the fresh process's Ray workers start and import torch during its first seconds),
   scores per task CPU-second, and the job's ``phases`` (``pipelines.query.account``). With
   ``--warm`` the job runs a second time in the same process, its workers up: ``warm_*``.
3. ``efficiency`` = end-to-end scores/s / (kernel scores/s x CPUs), at the largest query count
   (``efficiency_by_queries``: at each);
   ``cpu_efficiency`` = scores per task CPU-second / the kernel's per CPU-second (what the
   tasks' reading and merging cost, whatever the machine's load); ``memory_ratio`` = tree peak
   at the largest query count / at the smallest.
4. ``--cluster``: the same job on a loopback Ray cluster (``infra.ray_local``) of one node, then
   two, of ``--cluster-cpus`` CPUs each; each job runs three times in one process and the best
   of the second and third counts (the workers are up). Prints both rates, their ratio and the tasks per node.
5. ``--capacity RESULT``: the capacity table of docs/operations.md from a result line (a file
   holding this benchmark's output; its last line is used).

Ends with one JSON line holding at least codes, queries, peak_rss_mb, scores_per_s,
kernel_scores_per_s, efficiency. The machine may be shared: numbers from a loaded machine
are not targets met; re-run on a quiet one.
    nice .venv/bin/python benchmarks/query_scale.py --codes 200000 --queries 1000,10000
    nice .venv/bin/python benchmarks/query_scale.py --codes 10000000 --queries 64 --cluster
    .venv/bin/python benchmarks/query_scale.py --codes 100000000 --shard-rows 1000000 --queries 64,256,1024 --warm
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


def first_codes(gallery: str, max_codes: int) -> np.ndarray:
    from pipelines.formats.gallery import read_codes, require_gallery

    parts, n = [], 0
    for url in require_gallery(gallery).shard_urls():
        parts.append(read_codes(url, M)[1])
        n += len(parts[-1])
        if n >= max_codes:
            break
    return np.concatenate(parts)[:max_codes]


def per_core_rates(gallery: str, k: int, queries: int = 64, max_codes: int = 2_000_000) -> dict:
    """One thread, the gallery's first codes (a scan task's kernel call: ``scan.SCORE_ROWS``):
    the batched kernel's scores/s by wall clock and by CPU time (best of 3; CPU time is what a
    busy machine leaves least skewed), and code shards read and decoded per CPU-second (the
    second pass over the same shards, so from the page cache)."""
    import faiss
    import torch

    from pipelines.formats.gallery import read_codes, require_gallery
    from pipelines.query import kernels as kn

    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    codes = first_codes(gallery, max_codes)
    rng = np.random.default_rng(1)
    t = np.exp(3 * rng.standard_normal((queries, M, K)))
    tables = (t / t.sum(-1, keepdims=True)).astype(np.float32)
    kn.topk(tables[:4], codes[:10_000], k)  # warm up
    wall = cpu = float("inf")
    for _ in range(3):
        t0, c0 = time.perf_counter(), time.process_time()
        kn.topk(tables, codes, k, kernel="torch")
        wall, cpu = min(wall, time.perf_counter() - t0), min(cpu, time.process_time() - c0)
    g = require_gallery(gallery)
    shards = g.shards[:max(1, -(-max_codes // max(g.shards[0].rows, 1)))]
    c0 = time.process_time()
    for s in shards:
        read_codes(f"{g.url}/{s.path}", M)
    read_cpu = time.process_time() - c0
    rows, size = sum(s.rows for s in shards), sum(s.size for s in shards)
    return {"kernel_scores_per_s": queries * len(codes) / wall, "kernel_cpu_scores_per_s": queries * len(codes) / cpu,
            "read_codes_per_cpu_s": rows / read_cpu, "code_bytes": size / rows}


def run_one(args) -> None:
    """Child process: the query job under PeakMemory (``--repeat`` times, each into fresh results);
    prints one JSON line: the first run's rate (a fresh process: Ray started, its workers import
    torch during the scan's first seconds) and the last's (``warm_scores_per_s``: the workers up)."""
    from memory import PeakMemory
    from pipelines.query.run import QueryConfig, query_batch

    cfg = QueryConfig(top_k=args.top_k, rows_per_task=args.rows_per_task, query_block=args.query_block,
                      memory_mb=args.memory_mb, progress_interval=30.0)
    runs = []
    with PeakMemory() as peak:
        for i in range(args.repeat):
            runs.append(query_batch(args.model, args.gallery, args.query_set, f"{args.results}-{i}", cfg))
    first, last = runs[0], runs[-1]
    phases = first["phases"]
    print(json.dumps({"queries": first["queries"], "blocks": first["blocks"], "tasks": first["tasks"],
                      "rows_per_task": first["rows_per_task"], "kernel": first["kernel"],
                      "nodes": first["nodes"], "phases": phases, "scan_seconds": first["scan_seconds"],
                      "later_scan_seconds": [r["scan_seconds"] for r in runs[1:]], "seconds": first["seconds"],
                      "scores_per_s": first["scores_per_s"], "warm_scores_per_s": last["scores_per_s"],
                      "warm_phases": last["phases"],
                      "task_cpu_scores_per_s": first["queries"] * first["gallery_codes"] / max(phases["task_cpu_s"],
                                                                                                1e-9),
                      "peak_rss_mb": round(peak.tree_rss / 2**20), "peak_pss_mb": round(peak.tree_pss / 2**20),
                      "median_late_pss_mb": round(peak.median_late() / 2**20),
                      "driver_rss_mb": round(peak.driver_rss / 2**20)}))


def child(args, model: str, gallery: str, query_set: Path, results: Path, env: dict | None = None,
          repeat: int = 1) -> dict:
    """``run_one`` in a fresh Python process (its own Ray, or the cluster of ``env``'s RAY_ADDRESS)."""
    cmd = [sys.executable, __file__, "--one", "--model", model, "--gallery", gallery, "--query-set", str(query_set),
           "--results", str(results), "--top-k", str(args.top_k), "--rows-per-task", str(args.rows_per_task),
           "--memory-mb", str(args.memory_mb), "--query-block", str(args.query_block), "--repeat", str(repeat)]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env)
    if out.returncode:
        raise SystemExit(f"query job failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def cluster_runs(args, work: Path, model: str, gallery: str, query_set: Path) -> dict:
    """The scan on a loopback Ray cluster of 1 node, then of 2 (``--cluster-cpus`` CPUs each,
    ``infra.ray_local``): rates, their ratio and the tasks each node ran. Each job runs three
    times in one driver; the first (the workers' start-up) is left out and the best of the
    other two counts, as the kernel's best of 3 does."""
    from infra.ray_local import start, stop_pid

    runs = []
    for nodes in (1, 2):
        proc, address = start(nodes=nodes, cpus_per_node=args.cluster_cpus)
        try:
            load = os.getloadavg()[0]
            run = child(args, model, gallery, query_set, work / f"cluster-{nodes}-{time.time_ns()}",
                        {**os.environ, "RAY_ADDRESS": address}, repeat=3)
        finally:
            stop_pid(proc.pid)
        warm = run["later_scan_seconds"]
        run.update(cluster_nodes=nodes, load_avg=[load, os.getloadavg()[0]], warm_scan_seconds=warm,
                   best_scores_per_s=run["queries"] * args.codes / min(warm))
        run["nodes_used"] = len(run["warm_phases"]["node_tasks"])  # by the runs that count
        runs.append(run)
        print(f"{nodes} node(s) x {args.cluster_cpus:g} CPU: {run['tasks']} tasks on {run['nodes_used']} node(s) "
              f"{sorted(run['warm_phases']['node_tasks'].values())}, scan {min(warm)} s (best of {warm}; cold "
              f"{run['scan_seconds']} s) = {run['best_scores_per_s'] / 1e6:,.0f} M scores/s; "
              f"load {run['load_avg']}", flush=True)
    rates = [r["best_scores_per_s"] for r in runs]
    return {"codes": args.codes, "queries": runs[-1]["queries"], "cpus_per_node": args.cluster_cpus,
            "scores_per_s": rates, "ratio": rates[1] / rates[0], "nodes_used": [r["nodes_used"] for r in runs],
            "machine_cpus": cpus(), "runs": runs}


FACE_BYTES = 17.2  # storage per face, M = 4, K = 256, 1M-row shards, hashed face ids (docs/operations.md, Sizing)
CORES_PER_NODE = 16
CORE_HOUR_USD = 0.045  # assumed: about the on-demand price of a 16-vCPU compute VM / 16; not measured


def capacity_table(result: dict) -> str:
    """Markdown: storage, CPU-hours, scan time and cost for 100M / 1B faces x 1k / 100k / 1M
    queries on 1 / 10 / 100 nodes, from a result line's per-core rates (see docs/operations.md).

    CPU-seconds = overhead x (blocks x faces / read rate + queries x faces / kernel rate)
    (blocks: the default 1 GiB query block at 112 px; overhead: the measured job's task
    CPU-seconds over the same sum for its own gallery and queries); time = CPU-seconds / cores + one worker start-up
    (the run's warm-up); cost = cores x time x price per core-hour."""
    from pipelines.query.run import QueryConfig, block_queries

    block = block_queries(QueryConfig(), 112, M, K, D)
    read, kernel = result["read_codes_per_cpu_s"], result["kernel_cpu_scores_per_s"]
    startup = max(result["phases"]["warmup_s"], 1.0)
    # what the measured job's tasks spent beyond reading and the kernel (merging, threads, the load)
    run = result["runs"][-1]
    overhead = result["phases"]["task_cpu_s"] / (run["blocks"] * result["codes"] / read
                                                 + result["queries"] * result["codes"] / kernel)
    nodes = (1, 10, 100)
    lines = ["| faces | queries | storage | CPU-hours | " + " | ".join(f"time, {n} x {CORES_PER_NODE} cores" for n in nodes)
             + " | " + " | ".join(f"cost, {n} nodes" for n in nodes) + " |", "|" + "---|" * (4 + 2 * len(nodes))]
    for faces in (10**8, 10**9):
        for queries in (10**3, 10**5, 10**6):
            cpu_s = overhead * (-(-queries // block) * faces / read + queries * faces / kernel)
            times = [cpu_s / (n * CORES_PER_NODE) + startup for n in nodes]
            costs = [n * CORES_PER_NODE * t / 3600 * CORE_HOUR_USD for n, t in zip(nodes, times)]
            lines.append(f"| {faces / 1e6:,.0f} M | {queries:,} | {faces * FACE_BYTES / 1e9:,.1f} GB | "
                         f"{cpu_s / 3600:,.1f} | " + " | ".join(map(_duration, times)) + " | "
                         + " | ".join(f"${c:,.2f}" if c >= 0.01 else "< $0.01" for c in costs) + " |")
    lines.append(f"\nRates: kernel {kernel / 1e9:.2f} G scores per CPU-second, {read / 1e6:.1f} M codes read per "
                 f"CPU-second, overhead x{overhead:.2f}, start-up {startup:.1f} s, {block} queries a block, "
                 f"{FACE_BYTES} bytes a face, ${CORE_HOUR_USD} per core-hour")
    return "\n".join(lines)


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min" if seconds < 7200 else \
        f"{seconds / 3600:.1f} h"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--codes", type=int, default=200_000)
    p.add_argument("--queries", default="1000,10000", help="comma-separated query counts, smallest first")
    p.add_argument("--top-k", type=int, default=100)
    p.add_argument("--shard-rows", type=int, default=100_000)
    p.add_argument("--rows-per-task", type=int, default=0, help="codes per scan task (0: the job sizes its tasks)")
    p.add_argument("--memory-mb", type=int, default=256)
    p.add_argument("--query-block", type=int, default=0)
    p.add_argument("--workdir", default="", help="keep the synthetic data here (reused when present)")
    p.add_argument("--warm", action="store_true",
                   help="run each job twice in one process and report the second run too (the workers up)")
    p.add_argument("--cluster", action="store_true",
                   help="scan on a loopback Ray cluster of 1 node, then 2 nodes (infra.ray_local); report the ratio")
    p.add_argument("--cluster-cpus", type=float, default=1, help="CPUs of each loopback node (--cluster)")
    p.add_argument("--capacity", metavar="JSON", help="print the capacity table from a result JSON line of this "
                                                      "benchmark (a file) and exit")
    p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--repeat", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--gallery", help=argparse.SUPPRESS)
    p.add_argument("--query-set", dest="query_set", help=argparse.SUPPRESS)
    p.add_argument("--results", dest="results", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.one:
        run_one(args)
        return 0
    if args.capacity:
        print(capacity_table(json.loads(Path(args.capacity).read_text().strip().splitlines()[-1])))
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
    for n in counts:
        if not (work / f"queries-{n}").exists():
            write_query_faces(work / f"queries-{n}", n)
    if args.cluster:
        print(json.dumps(cluster_runs(args, work, model, gallery, work / f"queries-{counts[-1]}")))
        return 0
    rates = per_core_rates(gallery, args.top_k)
    kernel = rates["kernel_scores_per_s"]
    print(f"per core (1 thread, 64 queries, top-{args.top_k}): kernel {kernel / 1e6:,.0f} M scores/s "
          f"({rates['kernel_cpu_scores_per_s'] / 1e6:,.0f} M per CPU-second), code shards read "
          f"{rates['read_codes_per_cpu_s'] / 1e6:,.1f} M codes per CPU-second", flush=True)
    runs = []
    for n in counts:
        run = child(args, model, gallery, work / f"queries-{n}", work / f"results-{n}-{time.time_ns()}",
                    repeat=2 if args.warm else 1)
        run["efficiency"] = run["scores_per_s"] / (kernel * cpus())
        run["warm_efficiency"] = run["warm_scores_per_s"] / (kernel * cpus())
        runs.append(run)
        warm = (f" (second run, workers up: {run['warm_scores_per_s'] / 1e6:,.0f} M scores/s, efficiency "
                f"{run['warm_efficiency']:.2f})" if args.warm else "")
        print(f"{run['queries']} queries x {args.codes} codes: {run['blocks']} blocks, scan {run['scan_seconds']} s "
              f"= {run['scores_per_s'] / 1e6:,.0f} M scores/s, efficiency {run['efficiency']:.2f}{warm}; peak tree "
              f"RSS {run['peak_rss_mb']} MB, PSS {run['peak_pss_mb']} MB (driver {run['driver_rss_mb']} MB)",
              flush=True)
        print(f"  {run['tasks']} tasks of <= {run['rows_per_task']} codes, kernel {run['kernel']}; phases "
              f"{run['phases']}", flush=True)
    last, first = runs[-1], runs[0]
    result = {"codes": args.codes, "queries": last["queries"], "peak_rss_mb": last["peak_rss_mb"],
              "scores_per_s": last["scores_per_s"], "kernel_scores_per_s": kernel,
              "efficiency": last["efficiency"], "cpus": cpus(),
              "efficiency_by_queries": {r["queries"]: round(r["efficiency"], 3) for r in runs},
              **({"warm_efficiency_by_queries": {r["queries"]: round(r["warm_efficiency"], 3) for r in runs}}
                 if args.warm else {}),
              "task_cpu_scores_per_s": last["task_cpu_scores_per_s"],
              "cpu_efficiency": last["task_cpu_scores_per_s"] / rates["kernel_cpu_scores_per_s"], **rates,
              "memory_ratio_rss": last["peak_rss_mb"] / max(first["peak_rss_mb"], 1),
              "memory_ratio_pss": last["peak_pss_mb"] / max(first["peak_pss_mb"], 1),
              "phases": last["phases"], "top_k": args.top_k, "memory_mb": args.memory_mb,
              "query_block": args.query_block, "load_avg": os.getloadavg(), "runs": runs}
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
