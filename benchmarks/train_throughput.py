"""Training throughput: Ray Train DDP (2 workers x 1 thread) vs the local trainer (1 process x
2 threads) on the same configuration and the same face shards, measured in the same run.

Samples/s are taken from the epochs after the first (warm-up: Ray start, Ray Data pipeline,
first allocation) and the best epoch of each trainer is compared.

    .venv/bin/python benchmarks/train_throughput.py [--identities 40 --photos 20 --epochs 4]

The last line is one JSON object: {"ray_samples_per_s", "local_samples_per_s", "ratio"}.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # face-shard writer
from face_datasets import write_face_dataset  # noqa: E402

from pipelines.settings import dataset_dir  # noqa: E402
from pipelines.train.config import RayTrainConfig  # noqa: E402
from pipelines.train.run import train  # noqa: E402
from pipelines.train_local import TrainConfig, train_local  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--identities", type=int, default=40)
    ap.add_argument("--photos", type=int, default=20)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--width", type=float, default=0.25)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--cache-decoded", action="store_true", help="Ray: keep decoded faces in the object store")
    args = ap.parse_args(argv)
    common = dict(bits=32, codewords=256, dim=0, width=args.width, image_size=32, epochs=args.epochs,
                  batch_size=args.batch_size)
    with tempfile.TemporaryDirectory() as tmp:
        ds = write_face_dataset(Path(tmp) / "ds", dataset_dir("lfw"), identities=args.identities,
                                photos=args.photos, size=64, shards=4, queries_per_identity=0)
        local = train_local(TrainConfig(data=str(ds), model_url=f"{tmp}/local.pt", threads=2, **common),
                            evaluate=False)["history"]
        ray_hist = train(RayTrainConfig(dataset=str(ds), model_url=f"{tmp}/ray.pt", workers=2, threads_per_worker=1,
                                        cache_decoded=args.cache_decoded, shuffle_buffer=256, **common))["history"]
    local_rate = max(h["samples_per_s"] for h in local[1:] or local)
    ray_rate = max(h["samples_per_s"] for h in ray_hist[1:] or ray_hist)
    print(f"local (1 x 2 threads): {[round(h['samples_per_s'], 1) for h in local]} samples/s per epoch")
    print(f"ray   (2 x 1 thread):  {[round(h['samples_per_s'], 1) for h in ray_hist]} samples/s per epoch")
    print(json.dumps({"ray_samples_per_s": round(ray_rate, 1), "local_samples_per_s": round(local_rate, 1),
                      "ratio": round(ray_rate / local_rate, 3)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
