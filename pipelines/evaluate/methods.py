"""Retrieval methods by name: OPQN and its ablations, DPQ-style learned PQ, DCDH hashing.

Every method is built from the same ``TrainConfig`` (backbone width, image size, code length,
D) and trained by the same loop (``train_method``: the trainer's ``train_epoch``, ``batches``,
``make_optimizer`` and ``train_step``), so a comparison differs only in the head and loss.
A method also says how a database is encoded and how queries score it:

- ``opqn``, ``l2q``, ``A``, ``C``, ``S``, ``W``: codes ``argmax p_m``, query tables ``P_q``,
  ``score = sum_m P_q[m, b_im]`` (``model.scoring.lut_scores``).
- ``dpq``: codes ``argmax p_m`` over learned codewords, asymmetric tables
  ``-||soft_qm - C_m[:, k]||^2``, summed with the same LUT scoring.
- ``dcdh``: ``bits`` sign bits, score = -Hamming distance.

The float upper bound of every method is the cosine of its unquantized D-dim backbone
feature (the vector that feeds the quantizer or the hashing layer).
"""
from __future__ import annotations

import sys
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch

from model.losses import OPQNWithLoss
from model.opqn import OPQN, VARIANTS, OPQNConfig, shape_for_bits
from model.scoring import lut_scores
from pipelines.checkpoint import load_checkpoint, save_checkpoint
from pipelines.evaluate.baselines import DCDH, DPQ, DCDHConfig, DPQConfig, hamming_distances
from pipelines.image_folder import FaceSet
from pipelines.progress import Progress
from pipelines.recipe import make_optimizer
from pipelines.train.loop import steps_per_epoch, train_epoch
from pipelines.train_local import TrainConfig


@dataclass(frozen=True)
class Method:
    name: str
    family: str  # "opqn", "dpq" or "dcdh": which network and config class
    label: str  # name in tables and plots
    ranking: str  # how a query scores the database, for reports
    variant: str = "opqn"


_PQ_RANKING = "score(q, i) = sum_m P_q[m, b_im] (LUT, codes argmax p_m)"
METHODS: dict[str, Method] = {
    **{v: Method(v, "opqn", "OPQN" if v == "opqn" else f"OPQN-{v}", _PQ_RANKING, v) for v in VARIANTS},
    "dpq": Method("dpq", "dpq", "DPQ", "score(q, i) = -sum_m ||soft_qm - C_m[b_im]||^2 (asymmetric, learned codewords)", "dpq"),
    "dcdh": Method("dcdh", "dcdh", "DCDH", "score(q, i) = -Hamming(sign codes)", "dcdh"),
}
CONFIG_CLASSES = {"opqn": OPQNConfig, "dpq": DPQConfig, "dcdh": DCDHConfig}
MODEL_CLASSES = {"opqn": OPQN, "dpq": DPQ, "dcdh": DCDH}


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose from {sorted(METHODS)}")
    return METHODS[name]


def method_config(name: str, cfg: TrainConfig, num_classes: int):
    """The network config of a method for a training config (same backbone, bits, D)."""
    method = get_method(name)
    common = dict(num_classes=num_classes, image_size=cfg.image_size, width=cfg.width)
    if method.family == "opqn":
        # The variant's switches win over the training config's (TrainConfig.opqn_config passes
        # lam=cfg.lam explicitly, which would undo OPQN-W's lam=0).
        base = TrainConfig(**{**asdict(cfg), "variant": method.variant}).opqn_config(num_classes)
        return replace(base, **VARIANTS[method.variant])
    if method.family == "dpq":
        return DPQConfig(M=shape_for_bits(cfg.bits, cfg.codewords), K=cfg.codewords, D=cfg.dim, **common)
    D = cfg.dim or shape_for_bits(cfg.bits, cfg.codewords) * cfg.codewords  # same D as the PQ methods
    return DCDHConfig(bits=cfg.bits, D=D, **common)


def build_model(name: str, cfg: TrainConfig, num_classes: int) -> torch.nn.Module:
    method = get_method(name)
    return MODEL_CLASSES[method.family](method_config(name, cfg, num_classes))


class BaselineWithLoss(torch.nn.Module):
    """A baseline network and its loss as one module, like ``model.losses.OPQNWithLoss``."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.net.training_loss(self.net(images), labels)


def with_loss(model: torch.nn.Module) -> torch.nn.Module:
    """What ``train_step`` trains: the network with its loss inside ``forward``."""
    return OPQNWithLoss(model) if isinstance(model, OPQN) else BaselineWithLoss(model)


def method_of(model: torch.nn.Module) -> Method:
    if isinstance(model, OPQN):
        return get_method(model.cfg.variant if model.cfg.variant in VARIANTS else "opqn")
    return get_method(model.cfg.variant)


def train_method(name: str, cfg: TrainConfig, train_set: FaceSet, out=None) -> tuple[torch.nn.Module, dict]:
    """Train a method from scratch on ``train_set``; checkpoint to ``cfg.model_url`` if set.

    Seeds, batches, augmentation, optimizer and lr schedule are the single-process trainer's.
    Progress lines go to ``out`` (default stderr).
    """
    out = out if out is not None else sys.stderr
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    classes = sorted(set(train_set.labels.tolist()))
    model = build_model(name, cfg, len(classes))
    steps = steps_per_epoch(len(train_set), cfg.batch_size)
    opt, sched = make_optimizer(model, cfg, steps)
    gen = torch.Generator().manual_seed(cfg.seed)
    label_of = {c: i for i, c in enumerate(classes)}
    labels = torch.tensor([label_of[c] for c in train_set.labels])
    trainable = with_loss(model)
    method = get_method(name)
    print(f"training {method.label} {cfg.bits} bit on {len(train_set)} faces of {len(classes)} identities, "
          f"{cfg.image_size}px width {cfg.width}, {cfg.epochs} epochs", file=out)
    per_epoch = min(len(train_set), steps * cfg.batch_size)
    progress = Progress(cfg.epochs * per_epoch, "samples", f"train {name}", interval=0, stream=out)
    history, done = [], 0
    for epoch in range(cfg.epochs):
        means, taken = train_epoch(trainable, opt, sched, train_set.images, labels, cfg, gen,
                                   step_budget=cfg.max_steps - done if cfg.max_steps else 0)
        done += taken
        record = {"epoch": epoch + 1, "lr": opt.param_groups[0]["lr"], **means}
        history.append(record)
        progress.update(per_epoch, extra=f"epoch {epoch + 1}/{cfg.epochs} loss {record['loss']:.3f} acc {record['acc']:.3f}")
        if cfg.max_steps and done >= cfg.max_steps:
            break
    model.eval()
    if cfg.model_url:
        save_checkpoint(cfg.model_url, {
            "method": name, "config": model.cfg.to_dict(), "train": asdict(cfg), "classes": classes,
            "model": model.state_dict(), "epoch": len(history), "history": history,
            "train_seconds": round(progress.elapsed(), 1)})
    return model, {"history": history, "train_seconds": progress.elapsed(), "identities": len(classes),
                   "train_faces": len(train_set)}


def model_from_state(state: dict, expect_method: str | None = None) -> tuple[torch.nn.Module, Method]:
    """Rebuild any method's network from a loaded checkpoint (train-local ones are OPQN).

    The weights must match the shapes the stored config implies: a checkpoint whose (D, M, K)
    or code length disagrees with its tensors is an error that names both.
    """
    config = dict(state.get("config") or {})
    name = state.get("method") or config.get("variant") or "opqn"
    method = get_method(name)
    if expect_method and expect_method != name:
        raise ValueError(f"the checkpoint holds method {name!r}, not {expect_method!r}")
    cfg = CONFIG_CLASSES[method.family].from_dict(config)
    model = MODEL_CLASSES[method.family](cfg)
    expected = model.state_dict()
    weights = state.get("model") or {}
    missing = sorted(set(expected) - set(weights))
    wrong = [(k, tuple(weights[k].shape), tuple(v.shape)) for k, v in expected.items()
             if k in weights and tuple(weights[k].shape) != tuple(v.shape)]
    if missing or wrong:
        shape = (f"D={cfg.D}, M={cfg.M}, K={cfg.K}" if hasattr(cfg, "M") else f"D={cfg.D}, bits={cfg.bits}")
        detail = "; ".join(f"{k}: checkpoint {a} vs config {b}" for k, a, b in wrong[:4])
        if missing:
            detail += f"{'; ' if detail else ''}missing tensors {missing[:4]}"
        raise ValueError(f"checkpoint weights do not match its {method.label} config ({shape}): {detail}")
    model.load_state_dict(weights)
    return model.eval(), method


def load_model(url: str, expect_method: str | None = None):
    """(model, method, state) from a checkpoint URL."""
    state = load_checkpoint(url)
    model, method = model_from_state(state, expect_method)
    return model, method, state


@torch.no_grad()
def quantized_scores(model: torch.nn.Module, xq: torch.Tensor, xd: torch.Tensor) -> tuple[np.ndarray, torch.Tensor]:
    """(scores (nq, N), database codes) of the method's compact-code retrieval."""
    codes = model.codes_from_features(xd)
    if isinstance(model, DCDH):
        scores = -hamming_distances(model.codes_from_features(xq), codes).float()
    else:
        scores = lut_scores(model.tables_from_features(xq), codes)
    return scores.numpy(), codes


def code_bits(model: torch.nn.Module) -> int:
    return int(round(model.cfg.bits))
