"""The training recipe shared by every trainer: network shape, loss weights, SGD schedule, augmentation.

Keeping one definition means a checkpoint from the local trainer, the Ray trainer or the
method comparison names the same settings, and runs can be compared on identical
configurations.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from model.dcdh import DCDHConfig
from model.dpq import DPQConfig
from model.opqn import OPQNConfig, config_for_variant, shape_for_bits
from model.registry import get_method
from pipelines.formats.checkpoint import DEFAULT_ENLARGE, stored_image_size


@dataclass
class Recipe:
    bits: int = field(default=32, metadata={"help": "code length in bits: M * log2(K) (M codebooks of K codewords)"})
    codewords: int = field(default=256, metadata={"help": "K: codewords per codebook"})
    dim: int = field(default=0, metadata={"help": "D: feature dimension; 0 means M * K"})
    variant: str = field(default="opqn", metadata={"help": "network/loss variant: opqn or an ablation "
                                                            "(l2q, A, C, S, W; see model.opqn.config_for_variant)"})
    image_size: int = field(default=32, metadata={"help": "network input size in pixels (faces are resized to it)"})
    width: float = field(default=0.5, metadata={"help": "backbone width multiplier (1.0: the paper's ResNet)"})
    epochs: int = field(default=20, metadata={"help": "training epochs (a resumed run trains up to this many)"})
    batch_size: int = field(default=128, metadata={"help": "global batch (split across workers by the Ray "
                                                            "trainer); the paper's is 256"})
    lr: float = field(default=0.1, metadata={"help": "peak SGD learning rate"})
    momentum: float = field(default=0.9, metadata={"help": "SGD momentum"})
    weight_decay: float = field(default=5e-4, metadata={"help": "SGD weight decay"})
    schedule: str = field(default="onecycle", metadata={
        "help": "lr schedule: onecycle (warm-up, cosine anneal) or step (the paper's halvings)",
        "choices": ("onecycle", "step")})
    lr_step: int = field(default=0, metadata={"help": "step schedule: epochs between lr halvings; 0 scales the "
                                                       "paper's 35-of-200 to --epochs"})
    r: float = field(default=40.0, metadata={"help": "loss: CosFace scale s (the paper's 40)"})
    u: float = field(default=0.4, metadata={"help": "loss: CosFace margin m (the paper's 0.4)"})
    lam: float = field(default=0.1, metadata={"help": "loss: weight lambda of the entropy term"})
    balance: float = field(default=0.1, metadata={"help": "weight of the batch-level codeword-usage term "
                                                           "(0: the paper's loss)"})
    enlarge: float = field(default=DEFAULT_ENLARGE, metadata={"help": "augmentation: faces stored at this "
                                                                       "multiple of --image-size, randomly "
                                                                       "cropped back to it"})
    augment: str = field(default="crop,flip,light,grey,blur", metadata={
        "help": "augmentations, comma-separated, from crop, flip, light, grey, blur; the paper's: crop,flip"})
    seed: int = field(default=0, metadata={"help": "random seed (data split, initialisation, batch order)"})

    def opqn_config(self, num_classes: int) -> OPQNConfig:
        M = shape_for_bits(self.bits, self.codewords)
        return config_for_variant(self.variant, num_classes=num_classes, M=M, K=self.codewords, D=self.dim,
                                  image_size=self.image_size, width=self.width, r=self.r, u=self.u, lam=self.lam,
                                  balance=self.balance)

    def network_config(self, method: str, num_classes: int):
        """The network config of any registered method for this recipe: the same backbone, input
        size, code length in bits and D (DCDH hashes the D the PQ methods would use)."""
        m = get_method(method)
        if m.family == "opqn":
            return replace(self, variant=m.variant).opqn_config(num_classes)
        common = dict(num_classes=num_classes, image_size=self.image_size, width=self.width)
        M = shape_for_bits(self.bits, self.codewords)
        if m.family == "dpq":
            return DPQConfig(M=M, K=self.codewords, D=self.dim, **common)
        return DCDHConfig(bits=self.bits, D=self.dim or M * self.codewords, **common)

    def step_epochs(self) -> int:
        return self.lr_step or max(1, round(self.epochs * 35 / 200))

    def stored_size(self) -> int:
        return stored_image_size(self.image_size, self.enlarge)


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
