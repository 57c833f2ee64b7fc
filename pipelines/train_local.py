"""Single-process OPQN trainer: plain torch on an identity-folder image set.

This is the reference the distributed (Ray Train) trainer is compared with, and the
quickest way to get a model on one machine: it reads an LFW-style folder, splits each
identity's photos into queries and database/training photos, trains with the paper's recipe
(SGD momentum 0.9, weight decay 5e-4, lr halved every 35/200 of the run), checkpoints every
epoch to a storage URL, resumes from that checkpoint, and ends with retrieval metrics.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch

from model.losses import opqn_loss
from model.opqn import OPQN, config_for_variant, shape_for_bits
from pipelines.checkpoint import checkpoint_exists, load_checkpoint, save_checkpoint
from pipelines.image_folder import FaceSet, list_identity_folder, load_face_set, query_split
from pipelines.progress import Progress, format_seconds
from pipelines.retrieval import evaluate_retrieval, to_input
from pipelines.settings import data_root

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    data: str = ""  # identity-folder image directory; "" means <data root>/lfw
    model_url: str = "runs/opqn-local/model.pt"
    bits: int = 32
    codewords: int = 256  # K
    dim: int = 0  # D; 0 means M * K
    variant: str = "opqn"
    image_size: int = 32
    width: float = 0.25
    epochs: int = 20
    batch_size: int = 256
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    lr_step: int = 0  # epochs between lr halvings; 0 scales the paper's 35-of-200 to `epochs`
    r: float = 40.0
    u: float = 0.4
    lam: float = 0.1
    enlarge: float = 1.1  # augmentation: stored at 1.1x, random crop back to image_size
    crop_fraction: float = 0.5  # centre square of the photo holding the face (LFW deep-funneled ~0.44-0.5; 1.0 for tight crops)
    min_photos: int = 10
    query_fraction: float = 0.2
    seed: int = 0
    threads: int = 0  # torch threads; 0 leaves torch's default
    resume: bool = True
    max_steps: int = 0  # stop after this many optimizer steps (0: no limit); for smoke tests

    def opqn_config(self, num_classes: int):
        M = shape_for_bits(self.bits, self.codewords)
        return config_for_variant(self.variant, num_classes=num_classes, M=M, K=self.codewords, D=self.dim,
                                  image_size=self.image_size, width=self.width, r=self.r, u=self.u, lam=self.lam)

    def step_epochs(self) -> int:
        return self.lr_step or max(1, round(self.epochs * 35 / 200))

    def stored_size(self) -> int:
        return max(self.image_size, int(round(self.image_size * self.enlarge)))


def prepare_sets(cfg: TrainConfig) -> tuple[FaceSet, FaceSet]:
    """Load the folder and split it: (training/database set, query set)."""
    folder = cfg.data or str(data_root() / "lfw")
    items = list_identity_folder(folder, min_photos=cfg.min_photos)
    faces = load_face_set(items, cfg.stored_size(), cfg.crop_fraction, threads=max(2, cfg.threads))
    is_query = query_split(faces.labels, faces.paths, cfg.query_fraction, cfg.seed)
    return faces.subset(np.flatnonzero(~is_query)), faces.subset(np.flatnonzero(is_query))


def augment(images: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
    """Per-image random crop of ``size`` from the enlarged stored image, and random flip."""
    n, e = images.shape[0], images.shape[-1]
    offsets = torch.randint(0, e - size + 1, (n, 2), generator=generator)
    flips = torch.rand(n, generator=generator) < 0.5
    out = torch.empty(n, images.shape[1], size, size, dtype=images.dtype)
    for i in range(n):
        y, x = int(offsets[i, 0]), int(offsets[i, 1])
        crop = images[i, :, y:y + size, x:x + size]
        out[i] = crop.flip(-1) if flips[i] else crop
    return out.float().div(127.5).sub(1.0)


def batches(n: int, batch_size: int, generator: torch.Generator) -> list[torch.Tensor]:
    """A shuffled epoch; the last partial batch is dropped (BatchNorm needs > 1 sample)."""
    perm = torch.randperm(n, generator=generator)
    if n <= batch_size:
        return [perm]
    return [perm[i:i + batch_size] for i in range(0, n - batch_size + 1, batch_size)]


def train_step(model: OPQN, optimizer, images: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    model.train()
    out = model(images)
    parts = opqn_loss(out, labels, model.W, model.cfg)
    optimizer.zero_grad(set_to_none=True)
    parts["loss"].backward()
    optimizer.step()
    return {k: float(v.detach()) for k, v in parts.items()}


def make_optimizer(model: OPQN, cfg: TrainConfig):
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=cfg.step_epochs(), gamma=0.5)
    return opt, sched


def train_local(cfg: TrainConfig, train_set: FaceSet | None = None, query_set: FaceSet | None = None,
                evaluate: bool = True, out=sys.stderr) -> dict:
    """Train (or resume) and return the final epoch's losses plus retrieval metrics."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    if train_set is None:
        train_set, query_set = prepare_sets(cfg)
    classes = sorted(set(train_set.labels.tolist()))
    model = OPQN(cfg.opqn_config(len(classes)))
    opt, sched = make_optimizer(model, cfg)
    gen = torch.Generator().manual_seed(cfg.seed)
    start_epoch, history, steps = 0, [], 0
    if cfg.resume and checkpoint_exists(cfg.model_url):
        state = load_checkpoint(cfg.model_url)
        if state["config"] != model.cfg.to_dict() or state["classes"] != classes:
            raise ValueError(f"checkpoint {cfg.model_url} was trained with another configuration or identities; "
                             f"use a new model URL or --no-resume")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        gen.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        start_epoch, history = state["epoch"], state["history"]
        print(f"resuming {cfg.model_url} at epoch {start_epoch}/{cfg.epochs}", file=out)

    label_of = {c: i for i, c in enumerate(classes)}
    labels = torch.tensor([label_of[c] for c in train_set.labels])
    m = model.cfg
    print(f"training OPQN-{m.variant} {m.bits:g} bit (M={m.M}, K={m.K}, D={m.D}) on {len(train_set)} faces of "
          f"{len(classes)} identities, {m.image_size}px width {m.width}, {cfg.epochs} epochs", file=out)
    per_epoch = sum(len(b) for b in batches(len(train_set), cfg.batch_size, torch.Generator()))
    progress = Progress((cfg.epochs - start_epoch) * per_epoch, "samples", "train", interval=0, stream=out)
    for epoch in range(start_epoch, cfg.epochs):
        sums: dict[str, float] = {}
        seen = 0
        for idx in batches(len(train_set), cfg.batch_size, gen):
            parts = train_step(model, opt, augment(train_set.images[idx], m.image_size, gen), labels[idx])
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + v * len(idx)
            seen += len(idx)
            steps += 1
            if cfg.max_steps and steps >= cfg.max_steps:
                break
        sched.step()
        record = {"epoch": epoch + 1, "lr": opt.param_groups[0]["lr"], **{k: v / seen for k, v in sums.items()}}
        history.append(record)
        save_checkpoint(cfg.model_url, {
            "config": m.to_dict(), "train": asdict(cfg), "classes": classes, "model": model.state_dict(),
            "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "generator": gen.get_state(),
            "torch_rng": torch.get_rng_state(), "epoch": epoch + 1, "history": history})
        progress.update(per_epoch, extra="epoch {epoch}/{total} loss {loss:.3f} clf_x {clf_x:.3f} "
                        "clf_s {clf_s:.3f} entropy {entropy:.3f} acc {acc:.3f}".format(total=cfg.epochs, **record))
        if cfg.max_steps and steps >= cfg.max_steps:
            break
    result = {"history": history, "model_url": cfg.model_url, "train_faces": len(train_set),
              "identities": len(classes), "train_seconds": progress.elapsed()}
    if evaluate and query_set is not None and len(query_set):
        result["metrics"] = evaluate_retrieval(model, query_set, train_set)
    return result


def register(subparsers) -> None:
    p = subparsers.add_parser("train-local", help="train OPQN in one process on an identity-folder image set and print retrieval metrics",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = TrainConfig()
    for f in fields(TrainConfig):
        if f.name == "resume":
            p.add_argument("--no-resume", dest="resume", action="store_false", help="start over even if the checkpoint exists")
            continue
        kind = type(getattr(defaults, f.name))
        p.add_argument("--" + f.name.replace("_", "-"), type=kind, default=getattr(defaults, f.name),
                       help=f"(default: {getattr(defaults, f.name)!r})")
    p.add_argument("--json", action="store_true", help="print the result as one JSON line")
    p.set_defaults(func=run_cli)


def run_cli(args) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    cfg = TrainConfig(**{f.name: getattr(args, f.name) for f in fields(TrainConfig)})
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
