"""Single-process OPQN trainer: plain torch on an identity-folder image set.

This is the reference the distributed (Ray Train) trainer is compared with, and the
quickest way to get a model on one machine: it reads an LFW-style folder, splits each
identity's photos into queries and database/training photos, trains with the paper's recipe
(``pipelines.recipe``, the loop in ``pipelines.train.loop``), checkpoints every
epoch to a storage URL, resumes from that checkpoint, and ends with retrieval metrics.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch

from model.losses import OPQNWithLoss
from model.opqn import OPQN
from pipelines.checkpoint import checkpoint_exists, restore_training, save_checkpoint, training_state
from pipelines.faces import is_face_dataset, load_face_dataset
from pipelines.image_folder import FaceSet, list_identity_folder, load_face_set, query_split
from pipelines.recipe import Recipe, add_config_arguments, config_from_args, make_optimizer
from pipelines.train.loop import steps_per_epoch, train_epoch
from pipelines.progress import Progress, format_seconds
from pipelines.retrieval import evaluate_retrieval
from pipelines.settings import data_root

log = logging.getLogger(__name__)


@dataclass
class TrainConfig(Recipe):
    data: str = ""  # identity-folder image directory; "" means <data root>/lfw
    model_url: str = "runs/opqn-local/model.pt"
    # photo folders: centre square of each photo that holds the face (LFW deep-funneled faces
    # fill the centre ~0.44-0.5; 1.0 for tight crops). Face datasets hold aligned crops, used whole.
    crop_fraction: float = 0.44
    min_photos: int = 10
    query_fraction: float = 0.2
    threads: int = 0  # torch threads; 0 leaves torch's default
    resume: bool = True
    max_steps: int = 0  # stop after this many optimizer steps (0: no limit); for smoke tests


def prepare_sets(cfg: TrainConfig) -> tuple[FaceSet, FaceSet]:
    """Load the data and split it: (training/database set, query set).

    ``data`` is either a face dataset written by `opqn prepare` (its splits are used as
    recorded) or an identity-folder image directory (split here by ``query_fraction``).
    """
    folder = cfg.data or str(data_root() / "lfw")
    if is_face_dataset(folder):
        return (load_face_dataset(folder, ("database", "train"), cfg.stored_size()),
                load_face_dataset(folder, ("query",), cfg.stored_size(), allow_empty=True))
    items = list_identity_folder(folder, min_photos=cfg.min_photos)
    faces = load_face_set(items, cfg.stored_size(), cfg.crop_fraction, threads=max(2, cfg.threads))
    is_query = query_split(faces.labels, faces.paths, cfg.query_fraction, cfg.seed)
    return faces.subset(np.flatnonzero(~is_query)), faces.subset(np.flatnonzero(is_query))


def train_local(cfg: TrainConfig, train_set: FaceSet | None = None, query_set: FaceSet | None = None,
                evaluate: bool = True, out=None) -> dict:
    """Train (or resume) and return the final epoch's losses plus retrieval metrics."""
    out = out or sys.stderr  # resolved per call: a stream captured at import may be closed later
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    if train_set is None:
        train_set, query_set = prepare_sets(cfg)
    classes = sorted(set(train_set.labels.tolist()))
    model = OPQN(cfg.opqn_config(len(classes)))
    trainable = OPQNWithLoss(model)
    steps = steps_per_epoch(len(train_set), cfg.batch_size)
    opt, sched = make_optimizer(model, cfg, steps)
    gen = torch.Generator().manual_seed(cfg.seed)
    start_epoch, history, done = 0, [], 0
    if cfg.resume and checkpoint_exists(cfg.model_url):
        state = restore_training(cfg.model_url, model, opt, sched, classes)
        gen.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        start_epoch, history = state["epoch"], state["history"]
        print(f"resuming {cfg.model_url} at epoch {start_epoch}/{cfg.epochs}", file=out)

    label_of = {c: i for i, c in enumerate(classes)}
    labels = torch.tensor([label_of[c] for c in train_set.labels])
    m = model.cfg
    print(f"training OPQN-{m.variant} {m.bits:g} bit (M={m.M}, K={m.K}, D={m.D}) on {len(train_set)} faces of "
          f"{len(classes)} identities, {m.image_size}px width {m.width}, {cfg.epochs} epochs", file=out)
    per_epoch = min(len(train_set), steps * cfg.batch_size)
    progress = Progress((cfg.epochs - start_epoch) * per_epoch, "samples", "train", interval=0, stream=out)
    period_start = time.monotonic()  # an epoch's time includes the previous epoch's checkpoint, as on Ray
    for epoch in range(start_epoch, cfg.epochs):
        means, taken = train_epoch(trainable, opt, sched, train_set.images, labels, cfg, gen,
                                   step_budget=cfg.max_steps - done if cfg.max_steps else 0)
        done += taken
        elapsed, period_start = time.monotonic() - period_start, time.monotonic()
        record = {"epoch": epoch + 1, "lr": opt.param_groups[0]["lr"], **means, "epoch_seconds": elapsed,
                  "samples_per_s": means["samples"] / max(elapsed, 1e-9)}
        history.append(record)
        save_checkpoint(cfg.model_url, training_state(
            model, opt, sched, epoch=epoch + 1, history=history, classes=classes, train=asdict(cfg),
            generator=gen.get_state(), torch_rng=torch.get_rng_state()))
        progress.update(per_epoch, extra="epoch {epoch}/{total} loss {loss:.3f} clf_x {clf_x:.3f} "
                        "clf_s {clf_s:.3f} entropy {entropy:.3f} acc {acc:.3f}".format(total=cfg.epochs, **record))
        if cfg.max_steps and done >= cfg.max_steps:
            break
    result = {"history": history, "model_url": cfg.model_url, "train_faces": len(train_set),
              "identities": len(classes), "train_seconds": progress.elapsed()}
    if evaluate and query_set is not None and len(query_set):
        result["metrics"] = evaluate_retrieval(model, query_set, train_set)
    return result


def register(subparsers) -> None:
    p = subparsers.add_parser("train-local", help="train OPQN in one process on an identity-folder image set and print retrieval metrics",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(p, TrainConfig)
    p.add_argument("--json", action="store_true", help="print the result as one JSON line")
    p.set_defaults(func=run_cli)


def run_cli(args) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    cfg = config_from_args(TrainConfig, args)
    t0 = time.monotonic()
    result = train_local(cfg)
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
