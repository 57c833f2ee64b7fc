"""Training throughput: Ray Train DDP (2 workers x 1 thread) vs the single-process trainer
(1 process x 2 threads), on the same cores, face shards, recipe and seed, measured in one run.

Default scale is the main job's: every LFW identity with >= 10 photos (158 people), 20 % of each
identity's photos held out as queries, so both trainers train on the 3,463 database faces; 64 px
stored crops in 9 shards, 32 px input, 32 bit, and the training recipe's defaults (width 0.5,
batch 128). ``--small`` is a toy case (40 identities x 20 photos, batch 64).

An epoch's time runs from the end of the previous epoch's SGD steps to the end of its own, so
it includes the previous epoch's checkpoint, loss all-reduce and barrier; epochs laid end to
end add up to the run. Steady state = the mean over the epochs after the first (warm-up: Ray
start-up, each worker decoding its share, first allocations). Overhead = the part of a steady
epoch outside the SGD steps (forward, backward with DDP's all-reduce, update): data,
augmentation, checkpoint and synchronisation.

    .venv/bin/python benchmarks/train_throughput.py [--width 0.5] [--batch-size 128] [--epochs 4] [--small]

The last line is one JSON object: {"faces", "width", "batch_size", "ray_samples_per_s",
"local_samples_per_s", "ratio", "ray_overhead", "local_overhead"}.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # face-shard writer
from face_datasets import face_row, write_face_dataset  # noqa: E402

from pipelines.formats.faces import write_face_file  # noqa: E402
from pipelines.photo_folder import list_identity_folder, query_split  # noqa: E402
from pipelines.settings import dataset_dir  # noqa: E402
from pipelines.train.config import RayTrainConfig  # noqa: E402
from pipelines.train.local import TrainConfig, train_local  # noqa: E402
from pipelines.train.recipe import Recipe  # noqa: E402
from pipelines.train.run import train  # noqa: E402


def main_job_dataset(root: Path, lfw: Path, min_photos: int = 10, shards: int = 9, size: int = 64) -> Path:
    """The main job's faces: identities with >= ``min_photos`` photos, 20 % of each as queries."""
    items = list_identity_folder(lfw, min_photos=min_photos)
    labels = [ident for ident, _ in items]
    is_query = query_split(np.asarray(labels), [p for _, p in items], 0.2, 0)
    rows = [face_row(ident, Path(path), "query" if q else "database", size)
            for (ident, path), q in zip(items, is_query)]
    (root / "faces").mkdir(parents=True, exist_ok=True)
    for s in range(shards):
        write_face_file(str(root), f"part-{s:05d}.parquet", rows[s::shards])
    return root


def steady(history: list[dict]) -> dict:
    """Means over the epochs after the first: samples/s, and where an epoch's seconds go."""
    epochs = history[1:] or history
    mean = lambda key: statistics.mean(h.get(key, 0.0) for h in epochs)  # noqa: E731
    out = {"samples_per_s": mean("samples_per_s"), "epoch": mean("epoch_seconds"), "steps": mean("step_seconds"),
           "data": mean("data_seconds"), "allreduce": mean("allreduce_seconds")}
    out["other"] = out["epoch"] - out["steps"] - out["data"]  # checkpoint, loss all-reduce, barrier
    out["overhead"] = 1.0 - out["steps"] / out["epoch"]
    return out


def breakdown(name: str, s: dict) -> str:
    return (f"{name}: {s['samples_per_s']:.1f} samples/s; epoch {s['epoch']:.2f} s = SGD steps {s['steps']:.2f} s "
            f"(gradient all-reduce <= {s['allreduce']:.2f} s of it, overlapped with backward) + data "
            f"{s['data']:.2f} s + other {s['other']:.2f} s; overhead {s['overhead']:.1%}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--width", type=float, default=Recipe.width)
    ap.add_argument("--batch-size", type=int, default=0, help=f"default: {Recipe.batch_size} (64 with --small)")
    ap.add_argument("--small", action="store_true", help="the toy case: 40 identities x 20 photos, batch 64")
    ap.add_argument("--cache-mb", type=int, default=4096, help="Ray: 0 streams faces from Ray Data every epoch")
    args = ap.parse_args(argv)
    batch = args.batch_size or (64 if args.small else Recipe.batch_size)
    common = dict(bits=32, codewords=256, dim=0, width=args.width, image_size=32, epochs=args.epochs,
                  batch_size=batch)
    with tempfile.TemporaryDirectory() as tmp:
        if args.small:
            ds = write_face_dataset(Path(tmp) / "ds", dataset_dir("lfw"), identities=40, photos=20, size=64,
                                    shards=4, queries_per_identity=0)
        else:
            ds = main_job_dataset(Path(tmp) / "ds", dataset_dir("lfw"))
        local = train_local(TrainConfig(data=str(ds), model_url=f"{tmp}/local.pt", threads=2, **common),
                            evaluate=False)
        ray_run = train(RayTrainConfig(dataset=str(ds), model_url=f"{tmp}/ray.pt", workers=2, threads_per_worker=1,
                                       train_splits=("database",), cache_mb=args.cache_mb, **common))
    lo, ra = steady(local["history"]), steady(ray_run["history"])
    print(f"local (1 x 2 threads): {[round(h['samples_per_s'], 1) for h in local['history']]} samples/s per epoch")
    print(f"ray   (2 x 1 thread):  {[round(h['samples_per_s'], 1) for h in ray_run['history']]} samples/s per epoch")
    print(breakdown("local", lo))
    print(breakdown("ray  ", ra))
    print(json.dumps({"faces": local["train_faces"], "width": args.width, "batch_size": batch,
                      "ray_samples_per_s": round(ra["samples_per_s"], 1),
                      "local_samples_per_s": round(lo["samples_per_s"], 1),
                      "ratio": round(ra["samples_per_s"] / lo["samples_per_s"], 3),
                      "ray_overhead": round(ra["overhead"], 3), "local_overhead": round(lo["overhead"], 3)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
