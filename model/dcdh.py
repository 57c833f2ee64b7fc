"""DCDH: centre-based hashing, an OPQN baseline on the same ResNet20 backbone.

Zhang et al., "Deep Center-Based Dual-Constrained Hashing for Discriminative Face Image
Retrieval", Pattern Recognition 2021, compact version. A hashing layer
``h = tanh(Linear(x))`` with L = bits outputs; one learned centre per class whose sign is
the class's code in Hamming space. Dual constraints: a classification loss on the inner
products of h with the (tanh-relaxed) centres separates classes, a centre loss pulls h to
the sign of its class centre; a quantization loss pushes |h| to 1. Codes are ``sign(h)``,
and ranking is by Hamming distance (score = -Hamming distance, ties by database index).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from model.backbone import ResNet20
from model.config import ConfigDict


@dataclass(frozen=True)
class DCDHConfig(ConfigDict):
    num_classes: int
    bits: int = 32
    D: int = 512  # backbone feature size feeding the hashing layer
    image_size: int = 112
    width: float = 1.0
    in_channels: int = 3
    dropout: float = 0.5
    scale: float = 8.0  # logit scale of the centre classifier (inner products / bits)
    lam_center: float = 1.0  # pull h to the binary centre of its class
    lam_quant: float = 0.1  # push |h| to 1
    variant: str = "dcdh"

    def __post_init__(self):
        if self.bits < 1 or self.D < 1:
            raise ValueError(f"bits and D must be positive, got bits={self.bits}, D={self.D}")
        if self.num_classes < 2:
            raise ValueError(f"num_classes must be >= 2 to train a classifier, got {self.num_classes}")


class DCDH(nn.Module):
    def __init__(self, cfg: DCDHConfig):
        super().__init__()
        self.cfg = cfg
        self.backbone = ResNet20(cfg.D, cfg.image_size, cfg.width, cfg.in_channels, cfg.dropout)
        self.hash = nn.Linear(cfg.D, cfg.bits)
        self.centers = nn.Parameter(torch.randn(cfg.num_classes, cfg.bits))

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone(images)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self.features(images)
        return {"x": x, "h": torch.tanh(self.hash(x))}

    def training_loss(self, out: dict, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        cfg, h = self.cfg, out["h"]
        centers = torch.tanh(self.centers)
        logits = cfg.scale * h @ centers.T / cfg.bits
        clf = F.cross_entropy(logits, labels)
        target = torch.sign(centers[labels]).detach()
        center = (h - target).pow(2).sum(1).mean() / cfg.bits
        quant = (h.abs() - 1).pow(2).sum(1).mean() / cfg.bits
        with torch.no_grad():
            acc = (logits.argmax(-1) == labels).float().mean()
        return {"loss": clf + cfg.lam_center * center + cfg.lam_quant * quant, "clf": clf,
                "center": center, "quant": quant, "acc": acc}

    @torch.no_grad()
    def codes_from_features(self, x: torch.Tensor) -> torch.Tensor:
        """Binary codes (N, bits) as uint8 0/1: bit = h > 0 (sign, 0 counted as -1)."""
        return (self.hash(x) > 0).to(torch.uint8)

    @torch.no_grad()
    def scores(self, xq: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """Query features (nq, D) against database bits (N, bits): -Hamming distance, (nq, N)."""
        return -hamming_distances(self.codes_from_features(xq), codes).float()


def hamming_distances(query_codes: torch.Tensor, db_codes: torch.Tensor) -> torch.Tensor:
    """Hamming distances (nq, N) between 0/1 codes, via +-1 inner products: (L - <a, b>) / 2."""
    if query_codes.shape[1] != db_codes.shape[1]:
        raise ValueError(f"code lengths differ: {query_codes.shape[1]} vs {db_codes.shape[1]}")
    a = query_codes.float() * 2 - 1
    b = db_codes.float() * 2 - 1
    return ((a.shape[1] - a @ b.T) / 2).round().to(torch.int32)
