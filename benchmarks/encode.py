"""Gallery encoding: the encode pipeline vs a plain torch loop, and memory vs gallery size.

1. Throughput: the same face shards and model, encoded by `encode_gallery` (one Ray task per
   source shard, Ray's start included) and by a plain loop (pyarrow read -> decode -> model -> argmax)
   in the same run. 100k faces by default: at 20k, Ray's ~5 s start is a third of the run,
   which no real gallery encode pays in that proportion.
2. Memory: peak PSS of the whole process tree (driver + Ray workers) while encoding a
   synthetic gallery of N faces, for 100k and 1M faces, each on a fresh Ray instance, with
   source shards of ``--rss-shard-rows`` faces (ingest writes 500; with 50k the 100k gallery
   is two shards and never fills the pipeline). It should not grow with N. The median over
   the run's second half (``steady_mb_*``) shows the plateau without the peak's luck.

    .venv/bin/python benchmarks/encode.py [--faces 100000] [--rss-sizes 100000,1000000]

The last line is one JSON object:
{"faces_per_s", "baseline_faces_per_s", "ratio", "rss_mb_100k", "rss_mb_1m", "steady_mb_100k", ...}.
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

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image

from memory import PeakMemory
from model.opqn import OPQN, config_for_variant
from pipelines.formats.checkpoint import save_checkpoint
from pipelines.encode.run import EncodeConfig, encode_gallery
from pipelines.execution import start_ray
from pipelines.formats.faces import FACE_SCHEMA, decode_batch
from model.features import embed


def make_model(path: str, image_size: int, width: float) -> str:
    torch.manual_seed(0)
    model = OPQN(config_for_variant("opqn", num_classes=10, M=4, K=256, image_size=image_size, width=width)).eval()
    save_checkpoint(path, {"config": model.cfg.to_dict(), "train": {"enlarge": 1.1}, "classes": [str(i) for i in range(10)],
                           "model": model.state_dict(), "epoch": 0, "history": []})
    return path


def synthetic_dataset(root: Path, faces: int, side: int, shard_rows: int, split: str = "database",
                      pool_size: int = 512, prefix: str = "face-") -> Path:
    """Random-noise crops (a pool of ``pool_size`` distinct PNGs, reused) with unique face ids,
    all of one split, in shards of ``shard_rows`` listed by no manifest."""
    rng = np.random.default_rng(0)
    pool = []
    for _ in range(pool_size):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (side, side, 3), dtype=np.uint8)).save(buf, format="PNG")
        pool.append(buf.getvalue())
    (root / "faces").mkdir(parents=True, exist_ok=True)
    for s, start in enumerate(range(0, faces, shard_rows)):
        n = min(shard_rows, faces - start)
        ids = [f"{prefix}{start + i:09d}" for i in range(n)]
        table = pa.table({"face_id": ids, "identity": [f"id-{(start + i) % 1000}" for i in range(n)],
                          "source": ids, "split": [split] * n, "image": [pool[(start + i) % pool_size] for i in range(n)],
                          "box": [[0, 0, side, side]] * n, "landmarks": [[0.0] * 10] * n, "det_score": [1.0] * n},
                         schema=FACE_SCHEMA)
        pq.write_table(table, root / "faces" / f"part-{s:05d}.parquet")
    return root


def plain_loop(model_url: str, dataset: Path, batch_size: int) -> tuple[int, float]:
    from pipelines.formats.checkpoint import load_checkpoint, model_from_checkpoint
    from pipelines.formats.checkpoint import stored_size

    torch.set_num_threads(os.cpu_count() or 1)  # the plain loop may use every core
    t0 = time.monotonic()
    state = load_checkpoint(model_url)
    model, size = model_from_checkpoint(state), stored_size(state)
    n = 0
    for path in sorted((dataset / "faces").glob("*.parquet")):
        for batch in pq.ParquetFile(path).iter_batches(batch_size=batch_size, columns=["face_id", "image"]):
            images = torch.from_numpy(decode_batch(batch.column("image").to_pylist(), size))
            model.codes_from_features(embed(model, images))
            n += batch.num_rows
    return n, time.monotonic() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--faces", type=int, default=100000)
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--width", type=float, default=0.25)
    ap.add_argument("--batch-size", type=int, default=512)
    ap.add_argument("--rss-sizes", default="100000,1000000")
    ap.add_argument("--rss-image-size", type=int, default=16)
    ap.add_argument("--object-store-mb", type=int, default=1024)
    ap.add_argument("--rss-batch-size", type=int, default=EncodeConfig.batch_size,
                    help="encode batch size of the memory runs (default: encode's own)")
    ap.add_argument("--rss-shard-rows", type=int, default=5000, help="faces per source shard of the memory runs")
    args = ap.parse_args(argv)
    result = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        side = int(round(args.image_size * 1.1))
        model_url = make_model(str(tmp / "model.pt"), args.image_size, args.width)
        ds = synthetic_dataset(tmp / "ds", args.faces, side, shard_rows=max(1000, args.faces // 8))
        n, seconds = plain_loop(model_url, ds, args.batch_size)
        baseline = n / seconds
        t0 = time.monotonic()
        summary = encode_gallery(model_url, str(ds), str(tmp / "gallery"), EncodeConfig(batch_size=args.batch_size))
        pipeline = summary["faces"] / (time.monotonic() - t0)
        print(f"throughput: pipeline {pipeline:.0f} faces/s (Ray start included), plain loop {baseline:.0f} faces/s "
              f"on {n} faces", flush=True)
        result.update(faces_per_s=round(pipeline, 1), baseline_faces_per_s=round(baseline, 1),
                      ratio=round(pipeline / baseline, 3))
        # Memory runs under a fixed object store budget: with Ray's default of 30 % of RAM the
        # store's pages count in RSS up to that cap.
        # Each size runs on a fresh Ray instance, as a nightly encode would: on a shared one the
        # previous run's encode workers are still exiting when the next run's start, and their
        # memory would be counted against the larger gallery.
        import ray

        small_model = make_model(str(tmp / "small.pt"), args.rss_image_size, 0.125)
        for size in (int(s) for s in args.rss_sizes.split(",") if s):
            ds = synthetic_dataset(tmp / f"rss{size}", size, int(round(args.rss_image_size * 1.1)),
                                   shard_rows=args.rss_shard_rows)
            ray.shutdown()
            start_ray(object_store_mb=args.object_store_mb)
            with PeakMemory() as rss:
                t0 = time.monotonic()
                encode_gallery(small_model, str(ds), str(tmp / f"gallery{size}"), EncodeConfig(batch_size=args.rss_batch_size))
            key = f"rss_mb_{size // 1000}k" if size < 1_000_000 else f"rss_mb_{size // 1_000_000}m"
            result[key] = round(rss.tree_pss / 2**20, 1)
            result[key.replace("rss_mb", "driver_rss_mb")] = round(rss.driver_rss / 2**20, 1)
            result[key.replace("rss_mb", "steady_mb")] = round(rss.median_late() / 2**20, 1)
            print(f"memory: {size} faces encoded in {time.monotonic() - t0:.0f} s, peak {result[key]} MB "
                  f"(PSS of driver + Ray workers), "
                  f"median over the run's second half {rss.median_late() / 2**20:.0f} MB, "
                  f"driver alone {rss.driver_rss / 2**20:.0f} MB", flush=True)
            print("  at the peak: " + ", ".join(f"{k} {v / 2**20:.0f} MB" for k, v in rss.tree_pss_parts.items()),
                  flush=True)
            top = sorted(rss.by_process.items(), key=lambda kv: -kv[1])[:6]
            print("  largest: " + ", ".join(f"{k} {v / 2**20:.0f} MB" for k, v in top), flush=True)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
