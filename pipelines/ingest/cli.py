"""``opqn prepare SOURCE DATASET``: the ingest stage from the command line (mirrors ``prepare_dataset``)."""
from __future__ import annotations

import argparse

from .config import FORMATS, PROTOCOLS, SELECTIONS, IngestConfig


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "prepare",
        help="detect, align and crop faces from a photo tree into face shards (Parquet)",
        description="Photos under SOURCE (identity/photo tree or VGGFace2 layout; local path or s3://) "
                    "become aligned face crops in DATASET/faces/part-*.parquet, rejects in DATASET/rejects/, "
                    "listed by DATASET/manifest.json. Re-running processes only photos not yet in DATASET.",
    )
    p.add_argument("source", help="photo tree URL (path, file://, s3://)")
    p.add_argument("dataset", help="output dataset URL (path, file://, s3://)")
    p.add_argument("--size", type=int, default=112, help="crop size in pixels (112; 32 or 64 for CPU work)")
    p.add_argument("--format", dest="image_format", choices=FORMATS, default="png", help="crop encoding")
    p.add_argument("--jpeg-quality", type=int, default=95)
    p.add_argument("--select", choices=SELECTIONS, default="largest", help="which face of a photo to keep")
    p.add_argument("--keep-all", action="store_true", help="keep every face of a photo (galleries of group photos)")
    p.add_argument("--min-score", type=float, default=0.9, help="ignore detections below this score")
    p.add_argument("--min-face-size", type=int, default=20, help="smallest face MTCNN looks for, in detector pixels")
    p.add_argument("--detect-max-side", type=int, default=1280, help="photos are shrunk to this for detection")
    p.add_argument("--protocol", choices=PROTOCOLS, default="single",
                   help="single: query/database per identity; cross: whole identities held out as unseen")
    p.add_argument("--query-fraction", type=float, default=0.2)
    p.add_argument("--unseen-fraction", type=float, default=0.2)
    p.add_argument("--min-photos", type=int, default=1, help="reject identities with fewer distinct photos")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shard-size", type=int, default=500, help="photos per shard (the unit of resume)")
    p.add_argument("--batch-size", type=int, default=16, help="photos per detector call")
    p.add_argument("--workers", dest="num_workers", type=int, default=None, help="shards processed at once (default: one per CPU)")
    p.set_defaults(func=run_cli)


def config_from_args(args: argparse.Namespace) -> IngestConfig:
    keys = ("size", "image_format", "jpeg_quality", "select", "keep_all", "min_score", "min_face_size",
            "detect_max_side", "protocol", "query_fraction", "unseen_fraction", "min_photos", "seed",
            "shard_size", "batch_size", "num_workers")
    return IngestConfig(**{k: getattr(args, k) for k in keys})


def run_cli(args: argparse.Namespace) -> int:
    from .run import prepare_dataset

    prepare_dataset(args.source, args.dataset, config_from_args(args))
    return 0
