"""``opqn prepare SOURCE DATASET``: the ingest stage from the command line (mirrors ``prepare_dataset``)."""
from __future__ import annotations

import argparse
import dataclasses
import json

from pipelines.config_flags import add_config_arguments, add_json_flag, config_from_args as config_from_flags

from .config import IngestConfig


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
    add_config_arguments(p, IngestConfig)
    add_json_flag(p)
    p.set_defaults(func=run_cli)


def config_from_args(args: argparse.Namespace) -> IngestConfig:
    return config_from_flags(IngestConfig, args)


def run_cli(args: argparse.Namespace) -> int:
    from .run import prepare_dataset

    result = prepare_dataset(args.source, args.dataset, config_from_args(args))
    if args.json:
        print(json.dumps(dataclasses.asdict(result)))
    return 0
