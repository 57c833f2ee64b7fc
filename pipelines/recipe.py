"""The training recipe shared by the local and the Ray trainer: model shape, loss, SGD schedule.

Keeping one definition means a checkpoint from either trainer names the same settings and
the two trainers can be compared on identical configurations.
"""
from __future__ import annotations

import argparse
from dataclasses import MISSING, dataclass, fields

import torch

from model.opqn import OPQNConfig, config_for_variant, shape_for_bits


@dataclass
class Recipe:
    bits: int = 32
    codewords: int = 256  # K
    dim: int = 0  # D; 0 means M * K
    variant: str = "opqn"
    image_size: int = 32
    width: float = 0.5
    epochs: int = 20
    batch_size: int = 128  # global batch (split across workers by the Ray trainer); the paper's is 256
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "onecycle"  # lr schedule: "onecycle" (warm-up, cosine anneal) or "step" (the paper's halvings)
    lr_step: int = 0  # epochs between lr halvings; 0 scales the paper's 35-of-200 to `epochs`
    r: float = 40.0
    u: float = 0.4
    lam: float = 0.1
    balance: float = 0.1  # weight of the batch-level codeword-usage term (0: the paper's loss)
    enlarge: float = 1.1  # augmentation: stored at 1.1x, random crop back to image_size
    augment: str = "crop,flip,light,grey,blur"  # comma-separated; the paper's: crop,flip
    seed: int = 0

    def opqn_config(self, num_classes: int) -> OPQNConfig:
        M = shape_for_bits(self.bits, self.codewords)
        return config_for_variant(self.variant, num_classes=num_classes, M=M, K=self.codewords, D=self.dim,
                                  image_size=self.image_size, width=self.width, r=self.r, u=self.u, lam=self.lam,
                                  balance=self.balance)

    def step_epochs(self) -> int:
        return self.lr_step or max(1, round(self.epochs * 35 / 200))

    def stored_size(self) -> int:
        return max(self.image_size, int(round(self.image_size * self.enlarge)))


def make_optimizer(model: torch.nn.Module, recipe: "Recipe", steps: int = 1):
    """SGD and a per-step lr schedule; ``steps`` = optimizer steps per epoch.

    "onecycle": torch's OneCycleLR (warm up to ``lr`` over the first 30 % of all steps, then a
    cosine anneal to ~0, momentum cycled 0.95 -> 0.85 -> 0.95); "step": the paper's halving
    every ``step_epochs()`` epochs.
    """
    opt = torch.optim.SGD(model.parameters(), lr=recipe.lr, momentum=recipe.momentum, weight_decay=recipe.weight_decay)
    total = max(1, recipe.epochs * steps)
    if recipe.schedule == "onecycle":
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=recipe.lr, total_steps=total)
    elif recipe.schedule == "step":
        every = recipe.step_epochs() * steps
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 ** (s // every))
    else:
        raise ValueError(f"unknown lr schedule {recipe.schedule!r}; choose 'onecycle' or 'step'")
    return opt, sched


def add_config_arguments(parser: argparse.ArgumentParser, cls, skip=()) -> None:
    """One ``--flag`` per dataclass field (booleans become --flag / --no-flag)."""
    for f in fields(cls):
        if f.name in skip:
            continue
        default = f.default if f.default is not MISSING else f.default_factory()
        flag = "--" + f.name.replace("_", "-")
        if isinstance(default, bool):
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=default)
        elif isinstance(default, tuple):
            parser.add_argument(flag, dest=f.name, default=default, type=lambda s: tuple(x for x in s.split(",") if x),
                                help=f"comma-separated (default: {','.join(default)})")
        else:
            parser.add_argument(flag, dest=f.name, type=type(default), default=default, help=f"(default: {default!r})")


def config_from_args(cls, args, **extra):
    return cls(**{f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)}, **extra)
