"""Ingest throughput: the ingest pipeline vs a plain loop over the same LFW photos, same run.

Baseline: one process, one torch thread (with 2+ threads on a busy shared machine OpenMP
spin-waiting makes the loop many times slower, which would flatter the pipeline; pass
``--baseline-threads`` to compare anyway), for each photo: read, decode, MTCNN on that
one photo, align + encode the largest face (the per-photo work of the pipeline, without Ray,
batching or Parquet). Pipeline: ``prepare_dataset`` on in-process Ray with one CPU per core
(one Ray task per shard; Ray already started, its start-up reported apart), writing real
shards to a temporary dataset; ``faces_per_s`` counts worker start-up (a cold run),
``warm_faces_per_s`` is a second run in the same Ray session, whose workers already hold
MTCNN (steady state).

faces/s = face rows produced / wall seconds. Peak RSS: the driver plus every process under it
(Ray workers included), sampled every 0.2 s during the pipeline run. The last line is JSON.

    .venv/bin/python benchmarks/ingest.py [--photos 600] [--size 112] [--data DIR]
"""
from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from memory import PeakMemory


def pick_photos(lfw: Path, n: int) -> list[Path]:
    """Every k-th LFW photo (sorted), so the sample spans many identities."""
    photos = sorted(lfw.glob("*/*.jpg"))
    if not photos:
        raise FileNotFoundError(f"no LFW photos under {lfw} (set OPQN_DATA or --data)")
    step = max(1, len(photos) // n)
    return photos[::step][:n]


def baseline(photos: list[Path], size: int, threads: int) -> tuple[int, float]:
    import numpy as np
    import torch
    from PIL import Image

    from pipelines.ingest.align import warp_face
    from pipelines.ingest.mtcnn import MTCNN

    torch.set_num_threads(threads)
    mtcnn = MTCNN()
    mtcnn.detect([np.asarray(Image.open(photos[0]).convert("RGB"))])  # warm-up
    faces = 0
    start = time.perf_counter()
    for path in photos:
        im = Image.open(io.BytesIO(path.read_bytes())).convert("RGB")
        det = mtcnn.detect([np.asarray(im)])[0]
        ok = np.where(det.scores >= 0.9)[0]
        if len(ok):
            area = (det.boxes[ok, 2] - det.boxes[ok, 0]) * (det.boxes[ok, 3] - det.boxes[ok, 1])
            crop = warp_face(im, det.landmarks[ok[int(np.argmax(area))]], size)
            buf = io.BytesIO()
            crop.save(buf, format="PNG")
            faces += 1
    return faces, time.perf_counter() - start


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="", help="folder holding lfw/ (default: OPQN_DATA / ../shared/data)")
    # 600: at 200 photos the workers' start (MTCNN load, ~3 s) is a third of the run
    ap.add_argument("--photos", type=int, default=600)
    ap.add_argument("--size", type=int, default=112)
    ap.add_argument("--shard-size", type=int, default=50)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--baseline-threads", type=int, default=1)
    args = ap.parse_args(argv)
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

    from pipelines.settings import data_root

    lfw = (Path(args.data) if args.data else data_root()) / "lfw"
    photos = pick_photos(lfw, args.photos)
    cpus = os.cpu_count() or 1

    base_faces, base_s = baseline(photos, args.size, args.baseline_threads)
    print(f"baseline (plain loop, {args.baseline_threads} torch threads): {base_faces} faces in {base_s:.1f}s "
          f"= {base_faces / base_s:.1f} faces/s", file=sys.stderr)

    from pipelines.execution import start_ray
    from pipelines.ingest.config import IngestConfig
    from pipelines.ingest.run import prepare_dataset

    t0 = time.perf_counter()
    ray = start_ray(num_cpus=cpus, worker_logs=False)
    ray_init_s = time.perf_counter() - t0
    with tempfile.TemporaryDirectory(prefix="ingest-bench-") as tmp:
        src = Path(tmp) / "src"
        for p in photos:  # links, not copies: the same bytes as the baseline read
            (src / p.parent.name).mkdir(parents=True, exist_ok=True)
            os.symlink(p, src / p.parent.name / p.name)
        cfg = IngestConfig(size=args.size, shard_size=args.shard_size, batch_size=args.batch_size)
        with PeakMemory() as rss:
            t0 = time.perf_counter()
            result = prepare_dataset(str(src), str(Path(tmp) / "ds"), cfg, stream=sys.stderr)
            pipe_s = time.perf_counter() - t0
            # Warm: a second dataset in the same Ray session reuses workers with MTCNN loaded.
            t0 = time.perf_counter()
            warm = prepare_dataset(str(src), str(Path(tmp) / "ds-warm"), cfg, stream=sys.stderr)
            warm_s = time.perf_counter() - t0
    ray.shutdown()
    pipe_fps, base_fps = result.faces / pipe_s, base_faces / base_s
    print(f"pipeline (Ray tasks, {cpus} CPUs): {result.faces} faces in {pipe_s:.1f}s = {pipe_fps:.1f} faces/s "
          f"(ray.init {ray_init_s:.1f}s not included); rejected {result.rejected}", file=sys.stderr)
    print(json.dumps({"faces_per_s": round(pipe_fps, 2), "baseline_faces_per_s": round(base_fps, 2),
                      "ratio": round(pipe_fps / base_fps, 3), "peak_rss_mb": round(rss.peak / 2 ** 20, 1),
                      "photos": len(photos), "faces": result.faces, "baseline_faces": base_faces,
                      "pipeline_s": round(pipe_s, 2), "baseline_s": round(base_s, 2),
                      "ray_init_s": round(ray_init_s, 2),
                      "warm_faces_per_s": round(warm.faces / warm_s, 2),
                      "warm_ratio": round(warm.faces / warm_s / base_fps, 3)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
