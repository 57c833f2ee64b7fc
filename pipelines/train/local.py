"""Single-process training: plain torch on faces held in memory, for any registered method.

The quickest way to get a model on one machine and the reference the distributed (Ray Train)
trainer is compared with. ``train_local`` reads an LFW-style folder or a face dataset, splits
each identity's photos into queries and database/training photos, trains OPQN with the recipe
(``pipelines.train.recipe``) and the loop every trainer runs (``pipelines.train.loop``),
checkpoints every epoch to a storage URL, resumes from that checkpoint, and ends with
retrieval metrics. ``train_method`` is the method comparison's trainer: the same function for
OPQN, its ablations, DPQ or DCDH, from scratch, so a comparison differs only in head and loss.
"""
from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from model.registry import get_method, with_loss
from pipelines.evaluate.evaluation import train_summary
from pipelines.formats.faces import FaceSet, is_face_dataset, load_face_dataset
from pipelines.formats.checkpoint import checkpoint_exists, restore_training, save_checkpoint, training_state
from pipelines.photo_folder import list_identity_folder, load_face_set, query_split
from pipelines.progress import Progress
from pipelines.settings import data_root
from pipelines.train.loop import steps_per_epoch, train_epoch
from pipelines.train.recipe import Recipe, make_optimizer

LOGGED_PARTS = ("clf_x", "clf_s", "entropy")  # loss parts on a progress line, besides loss and acc


@dataclass
class TrainConfig(Recipe):
    data: str = field(default="", metadata={"help": "identity-folder photo directory or face dataset; "
                                                     "\"\": <OPQN_DATA>/lfw"})
    model_url: str = field(default="runs/opqn-local/model.pt", metadata={"help": "checkpoint URL (path, file://, "
                                                                                  "s3://)"})
    crop_fraction: float = field(default=0.44, metadata={
        "help": "photo folders: centre square of each photo that holds the face (LFW deep-funneled faces fill "
                "the centre ~0.44-0.5; 1.0 for tight crops); face datasets hold aligned crops, used whole"})
    min_photos: int = field(default=10, metadata={"help": "photo folders: identities with fewer photos are "
                                                           "left out"})
    query_fraction: float = field(default=0.2, metadata={"help": "photo folders: fraction of each identity's "
                                                                  "photos held out as queries"})
    threads: int = field(default=0, metadata={"help": "torch threads; 0 leaves torch's default"})
    resume: bool = field(default=True, metadata={"help": "continue from the checkpoint at --model-url if one "
                                                          "exists"})
    max_steps: int = field(default=0, metadata={"help": "stop after this many optimizer steps (0: no limit; "
                                                         "for smoke tests)"})


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


def fit(method: str, cfg: TrainConfig, train_set: FaceSet, resume: bool, out) -> tuple[torch.nn.Module, dict]:
    """Train (or, with ``resume``, continue) ``method``'s network on ``train_set``.

    Checkpoints the whole training state to ``cfg.model_url`` (when set) after every epoch.
    Returns the network in eval mode and ``history``, ``train_seconds``, ``identities``,
    ``train_faces``.
    """
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    classes = sorted(set(train_set.labels.tolist()))
    spec = get_method(method)
    model = spec.model_class(cfg.network_config(method, len(classes)))
    trainable = with_loss(model)
    steps = steps_per_epoch(len(train_set), cfg.batch_size)
    opt, sched = make_optimizer(model, cfg, steps)
    gen = torch.Generator().manual_seed(cfg.seed)
    start_epoch, history, done = 0, [], 0
    if resume and cfg.model_url and checkpoint_exists(cfg.model_url):
        state = restore_training(cfg.model_url, model, opt, sched, classes)
        gen.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        start_epoch, history = state["epoch"], state["history"]
        print(f"resuming {cfg.model_url} at epoch {start_epoch}/{cfg.epochs}", file=out)

    label_of = {c: i for i, c in enumerate(classes)}
    labels = torch.tensor([label_of[c] for c in train_set.labels])
    m = model.cfg
    shape = f" (M={m.M}, K={m.K}, D={m.D})" if hasattr(m, "M") else f" (D={m.D})"
    print(f"training {spec.label} {m.bits:g} bit{shape} on {len(train_set)} faces of {len(classes)} identities, "
          f"{m.image_size}px width {m.width}, {cfg.epochs} epochs", file=out)
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
        if cfg.model_url:
            save_checkpoint(cfg.model_url, training_state(
                model, opt, sched, epoch=epoch + 1, history=history, classes=classes, train=asdict(cfg),
                generator=gen.get_state(), torch_rng=torch.get_rng_state(),
                train_seconds=round(progress.elapsed(), 1)))
        parts = "".join(f" {k} {record[k]:.3f}" for k in LOGGED_PARTS if k in record)
        progress.update(per_epoch, extra=f"epoch {epoch + 1}/{cfg.epochs} loss {record['loss']:.3f}{parts} "
                        f"acc {record['acc']:.3f}")
        if cfg.max_steps and done >= cfg.max_steps:
            break
    return model.eval(), {"history": history, "train_seconds": progress.elapsed(), "identities": len(classes),
                          "train_faces": len(train_set)}


def train_local(cfg: TrainConfig, train_set: FaceSet | None = None, query_set: FaceSet | None = None,
                evaluate: bool = True, out=None) -> dict:
    """Train (or resume) OPQN (``cfg.variant``) and return the final epoch's losses plus retrieval metrics."""
    out = out or sys.stderr  # resolved per call: a stream captured at import may be closed later
    if train_set is None:
        train_set, query_set = prepare_sets(cfg)
    model, info = fit(cfg.variant, cfg, train_set, cfg.resume, out)
    result = {"history": info["history"], "model_url": cfg.model_url, "train_faces": info["train_faces"],
              "identities": info["identities"], "train_seconds": info["train_seconds"]}
    if evaluate and query_set is not None and len(query_set):
        result["metrics"] = train_summary(model, query_set, train_set)
    return result


def train_method(name: str, cfg: TrainConfig, train_set: FaceSet, out=None) -> tuple[torch.nn.Module, dict]:
    """Train method ``name`` (OPQN, an ablation, DPQ, DCDH) from scratch on ``train_set``;
    checkpoint to ``cfg.model_url`` if set. Progress lines go to ``out`` (default stderr)."""
    return fit(name, cfg, train_set, False, out if out is not None else sys.stderr)
