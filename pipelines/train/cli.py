"""`opqn train DATASET MODEL_URL`: distributed training on Ray (in-process, or RAY_ADDRESS)."""
from __future__ import annotations

import json

from pipelines.recipe import add_config_arguments, config_from_args
from pipelines.train.config import RayTrainConfig


def register(subparsers) -> None:
    p = subparsers.add_parser("train", help="train OPQN with Ray Train DDP on a face dataset (RAY_ADDRESS for a cluster)",
                              description=__doc__)
    p.add_argument("dataset", help="face dataset URL (output of `opqn prepare`)")
    p.add_argument("model_url", help="checkpoint URL (path, file:// or s3://), reachable by every worker")
    add_config_arguments(p, RayTrainConfig, skip=("dataset", "model_url", "run_id"))
    p.add_argument("--json", action="store_true", help="print the final epoch record as JSON")
    p.set_defaults(func=run_cli)


def run_cli(args) -> int:
    from pipelines.train.run import train

    result = train(config_from_args(RayTrainConfig, args))
    if args.json:
        print(json.dumps(result["history"][-1]))
    return 0
