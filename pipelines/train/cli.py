"""The training commands: `opqn train` (Ray Train, in-process or RAY_ADDRESS), `opqn train-local`
(one process, ends with retrieval metrics) and `opqn train-method` (any method, for comparisons)."""
from __future__ import annotations

import argparse
import json
import logging
import time

from model.registry import METHODS
from pipelines.config_flags import add_config_arguments, add_json_flag, config_from_args
from pipelines.progress import format_seconds
from pipelines.train import local
from pipelines.train.config import RayTrainConfig
from pipelines.train.local import TrainConfig


def register(subparsers) -> None:
    p = subparsers.add_parser("train", help="train OPQN with Ray Train DDP on a face dataset (RAY_ADDRESS for a cluster)",
                              description="`opqn train DATASET MODEL_URL`: distributed training on Ray (in-process, or RAY_ADDRESS).")
    p.add_argument("dataset", metavar="DATASET", help="face dataset URL (output of `opqn prepare`)")
    p.add_argument("model_url", metavar="MODEL_URL", help="checkpoint URL (path, file:// or s3://), reachable by every worker")
    add_config_arguments(p, RayTrainConfig, skip=("dataset", "model_url", "run_id"))
    add_json_flag(p)
    p.set_defaults(func=run_train)

    p = subparsers.add_parser("train-local", help="train OPQN in one process on an identity-folder image set and print retrieval metrics",
                              description=local.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(p, TrainConfig)
    add_json_flag(p)
    p.set_defaults(func=run_train_local)

    t = subparsers.add_parser(
        "train-method", help="train OPQN, an ablation (l2q, A, C, S, W), DPQ or DCDH on an identity folder",
        description="The single-process trainer's data split, augmentation, optimizer and schedule for every "
                    "method; the checkpoint is readable by `opqn evaluate`.")
    t.add_argument("--method", choices=sorted(METHODS), default="opqn",
                   help="method to train: OPQN, an ablation of it, or a baseline")
    add_config_arguments(t, TrainConfig, skip=("resume", "variant"))
    add_json_flag(t)
    t.set_defaults(func=run_train_method)


def run_train(args) -> int:
    from pipelines.train.run import train  # Ray Train: imported only when this command runs

    result = train(config_from_args(RayTrainConfig, args))
    if args.json:  # the final epoch's record and the run's totals
        print(json.dumps({**(result["history"][-1] if result["history"] else {}), "epochs": result["epoch"],
                          **{k: result[k] for k in ("model_url", "identities", "faces", "nodes")}}, default=str))
    return 0


def run_train_local(args) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    cfg = config_from_args(TrainConfig, args)
    t0 = time.monotonic()
    result = local.train_local(cfg)
    metrics = result.get("metrics", {})
    if args.json:
        print(json.dumps({k: v for k, v in metrics.items() if not k.startswith("pr")}))
    if metrics:
        p = metrics["precision_at"]
        print(f"retrieval on {metrics['queries']} queries x {metrics['database']} database faces: "
              f"mAP {metrics['map']:.4f}  P@1 {p[1]:.4f}  P@5 {p[5]:.4f}  P@10 {p[10]:.4f}  "
              f"(float features mAP {metrics['map_float']:.4f}, P@5 {metrics['p5_float']:.4f})")
    print(f"done in {format_seconds(time.monotonic() - t0)}: {result['train_faces']} training faces, "
          f"{result['identities']} identities, checkpoint {result['model_url']}")
    return 0


def run_train_method(args) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    cfg = config_from_args(TrainConfig, args)
    train_set, _ = local.prepare_sets(cfg)
    _, info = local.train_method(args.method, cfg, train_set)
    if args.json:
        print(json.dumps({"method": args.method, "model_url": cfg.model_url,
                          **{k: v for k, v in info.items() if k != "history"}}, default=str))
    print(f"trained {args.method} in {format_seconds(info['train_seconds'])}: {info['train_faces']} faces, "
          f"{info['identities']} identities, checkpoint {cfg.model_url}")
    return 0
