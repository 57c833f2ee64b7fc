"""OPQN: backbone features split into M subspaces, soft-assigned to fixed orthonormal codewords.

Per subspace m a bias-free linear map F_m (d x K) gives assignment logits; p_m = softmax is
the soft assignment, s_m = C_m p_m the soft quantization that training classifies next to the
feature x_m, and argmax p_m is the hard code stored in a gallery. The query side keeps the
whole table P_q (M x K): score(q, i) = sum_m P_q[m, b_im] (OPQN Eq. 18).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from model.backbone import ResNet20
from model.codebooks import orthonormal_codebooks
from model.config import CodeShape, ConfigDict
from model.losses import opqn_loss
from model.scoring import lut_scores

# The paper's ablations, each a set of config switches on top of OPQN.
VARIANTS: dict[str, dict] = {
    "opqn": {},
    "l2q": {"learn_codebooks": True},        # OPQN-l2q: codewords learned (initialised from the DCT ones)
    "A": {"loss_branches": "s"},             # OPQN-A: classification loss on s only
    "C": {"classifier": "concat"},           # OPQN-C: one classifier on the concatenated sub-vectors
    "S": {"margin_loss": "softmax"},         # OPQN-S: plain softmax, no normalisation or margin
    "W": {"lam": 0.0},                       # OPQN-W: no entropy term
}


@dataclass(frozen=True)
class OPQNConfig(CodeShape, ConfigDict):
    """Everything that fixes the network's shape and loss; stored verbatim in checkpoints."""

    num_classes: int
    M: int = 4
    K: int = 256
    D: int = 0  # 0 means D = M * K (square codebooks, the cross-domain configuration)
    image_size: int = 112
    width: float = 1.0
    in_channels: int = 3
    dropout: float = 0.5
    r: float = 40.0  # CosFace scale (paper 40; reference code 20 at 32 px)
    u: float = 0.4  # CosFace margin (paper 0.4; reference code 0.5)
    lam: float = 0.1  # entropy weight lambda
    balance: float = 0.0  # weight of the batch codeword-usage term (0 in the paper)
    learn_codebooks: bool = False
    loss_branches: str = "xs"  # "xs": x and s; "s": s only (OPQN-A)
    classifier: str = "subspace"  # "subspace": W_m per subspace; "concat": one W on the whole vector
    margin_loss: str = "cosface"  # "cosface" or "softmax" (OPQN-S)
    query_normalize: bool = True  # query table from l2-normalised sub-vectors (reference code) or raw
    variant: str = "opqn"

    def __post_init__(self):
        self._check_code_shape()
        choices = {"loss_branches": ("xs", "s"), "classifier": ("subspace", "concat"),
                   "margin_loss": ("cosface", "softmax")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.K > 65536:
            raise ValueError(f"K={self.K} does not fit a uint16 code")


def config_for_variant(variant: str, **overrides) -> OPQNConfig:
    """The paper's variant by name (opqn, l2q, A, C, S, W) on top of the given fields.

    The variant's own switches are applied last: OPQN-W means lambda = 0 even when a recipe
    passes its default lambda along with everything else.
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown OPQN variant {variant!r}; choose from {sorted(VARIANTS)}")
    return OPQNConfig(**{**overrides, **VARIANTS[variant], "variant": variant})


def shape_for_bits(bits: int, K: int) -> int:
    """Number of codebooks M for a code length: bits = M * log2(K)."""
    if K < 2 or K & (K - 1):
        raise ValueError(f"K={K} must be a power of two so codes use whole bits")
    per = int(math.log2(K))
    if bits % per:
        raise ValueError(f"{bits} bits is not a multiple of log2(K)={per} bits per codebook")
    return bits // per


def code_dtype(K: int) -> torch.dtype:
    return torch.uint8 if K <= 256 else torch.uint16


class OPQN(nn.Module):
    def __init__(self, cfg: OPQNConfig):
        super().__init__()
        self.cfg = cfg
        M, d, K = cfg.M, cfg.d, cfg.K
        self.backbone = ResNet20(cfg.D, cfg.image_size, cfg.width, cfg.in_channels, cfg.dropout)
        self.F = nn.Parameter(torch.randn(M, d, K) * math.sqrt(2.0 / (d + K)))
        books = orthonormal_codebooks(cfg.D, M, K)
        if cfg.learn_codebooks:
            self.C = nn.Parameter(books)
        else:
            self.register_buffer("C", books)
        groups, dim = (M, d) if cfg.classifier == "subspace" else (1, cfg.D)
        self.W = nn.Parameter(torch.randn(groups, dim, cfg.num_classes) * math.sqrt(2.0 / (dim + cfg.num_classes)))

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """The D-dim bottleneck feature x (its cosine is the float upper bound of the codes)."""
        return self.backbone(images)

    def split(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(x.shape[0], self.cfg.M, self.cfg.d)

    def assignment_logits(self, x: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        xs = self.split(x)
        if normalize:
            xs = F.normalize(xs, dim=-1)
        return torch.einsum("bmd,mdk->bmk", xs, self.F)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self.features(images)
        logits = self.assignment_logits(x)
        p = logits.softmax(-1)
        s = torch.einsum("mdk,bmk->bmd", self.C, p)
        return {"x": x, "xs": self.split(x), "logits": logits, "p": p, "s": s}

    def training_loss(self, out: dict, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        return opqn_loss(out, labels, self.W, self.cfg)

    @torch.no_grad()
    def codes_from_features(self, x: torch.Tensor) -> torch.Tensor:
        """Hard codes b_m = argmax_k p_m, uint8 when K <= 256 else uint16."""
        return self.assignment_logits(x).argmax(-1).to(code_dtype(self.cfg.K))

    @torch.no_grad()
    def tables_from_features(self, x: torch.Tensor, normalize: bool | None = None) -> torch.Tensor:
        """Query tables P_q (B, M, K): softmax over codewords of the (normalised) sub-vectors."""
        normalize = self.cfg.query_normalize if normalize is None else normalize
        return self.assignment_logits(x, normalize=normalize).softmax(-1)

    @torch.no_grad()
    def scores(self, xq: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """Query features (nq, D) against database codes (N, M): sum_m P_q[m, b_im], (nq, N)."""
        return lut_scores(self.tables_from_features(xq), codes)
