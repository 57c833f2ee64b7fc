"""Baselines trained on the same ResNet20 backbone as OPQN: DPQ-style learned PQ and DCDH.

DPQ (Klein & Wolf, "End-to-End Supervised Product Quantization for Image Search and
Retrieval", CVPR 2019), compact version. Per subspace m, learned codewords ``C_m`` (K x d)
and a bias-free linear map give a soft assignment ``p_m = softmax(x_m F_m)``; the soft
representation is ``soft_m = C_m p_m``, the hard one the codeword of ``argmax p_m`` passed
through a straight-through estimator (forward: hard codeword, backward: gradient of soft).
Loss: softmax cross-entropy of one linear classifier on the soft and on the hard
representation, the Joint Central Loss (soft and hard pulled to the *same* class centre),
and the Gini terms (each p_m peaked, the batch-mean p_m spread). Retrieval is asymmetric:
the query's soft representation against the database's hard codewords,
``score = -sum_m ||soft_qm - C_m[b_im]||^2`` (M table look-ups, like OPQN).

DCDH (Zhang et al., "Deep Center-Based Dual-Constrained Hashing for Discriminative Face
Image Retrieval", Pattern Recognition 2021), compact version. A hashing layer
``h = tanh(Linear(x))`` with L = bits outputs; one learned centre per class whose sign is
the class's code in Hamming space. Dual constraints: a classification loss on the inner
products of h with the (tanh-relaxed) centres separates classes, a centre loss pulls h to
the sign of its class centre; a quantization loss pushes |h| to 1. Codes are ``sign(h)``,
and ranking is by Hamming distance (score = -Hamming distance, ties by database index).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from model.backbone import ResNet20
from model.opqn import CodeShape, code_dtype


class _ConfigMixin:
    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict):
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown {cls.__name__} keys: {unknown}")
        return cls(**values)


@dataclass(frozen=True)
class DPQConfig(CodeShape, _ConfigMixin):
    num_classes: int
    M: int = 4
    K: int = 256
    D: int = 0  # 0: D = M * K, as for OPQN
    image_size: int = 112
    width: float = 1.0
    in_channels: int = 3
    dropout: float = 0.5
    lam_center: float = 0.1  # Joint Central Loss weight
    lam_gini: float = 0.1  # weight of the per-sample Gini impurity (minimised)
    lam_batch_gini: float = 0.1  # weight of the batch Gini impurity (maximised)
    variant: str = "dpq"

    def __post_init__(self):
        self._check_code_shape()


class DPQ(nn.Module):
    def __init__(self, cfg: DPQConfig):
        super().__init__()
        self.cfg = cfg
        M, d, K = cfg.M, cfg.d, cfg.K
        self.backbone = ResNet20(cfg.D, cfg.image_size, cfg.width, cfg.in_channels, cfg.dropout)
        self.F = nn.Parameter(torch.randn(M, d, K) * math.sqrt(2.0 / (d + K)))
        self.C = nn.Parameter(torch.randn(M, d, K) / math.sqrt(d))  # learned codewords, columns
        self.classifier = nn.Linear(cfg.D, cfg.num_classes)
        self.centers = nn.Parameter(torch.zeros(cfg.num_classes, cfg.D))

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone(images)

    def split(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(x.shape[0], self.cfg.M, self.cfg.d)

    def assignment_logits(self, x: torch.Tensor) -> torch.Tensor:
        return torch.einsum("bmd,mdk->bmk", self.split(x), self.F)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self.features(images)
        logits = self.assignment_logits(x)
        p = logits.softmax(-1)
        soft = torch.einsum("mdk,bmk->bmd", self.C, p)
        onehot = F.one_hot(p.argmax(-1), self.cfg.K).to(p.dtype)
        hard = torch.einsum("mdk,bmk->bmd", self.C, onehot)
        hard = soft + (hard - soft).detach()  # straight-through estimator
        B = x.shape[0]
        return {"x": x, "logits": logits, "p": p, "soft": soft.reshape(B, -1), "hard": hard.reshape(B, -1)}

    def training_loss(self, out: dict, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        soft_logits, hard_logits = self.classifier(out["soft"]), self.classifier(out["hard"])
        clf_s = F.cross_entropy(soft_logits, labels)
        clf_h = F.cross_entropy(hard_logits, labels)
        c = self.centers[labels]
        jcl = ((out["soft"] - c).pow(2).sum(1) + (out["hard"] - c).pow(2).sum(1)).mean() / cfg.D
        p = out["p"]
        gini = (1 - p.pow(2).sum(-1)).mean()
        batch_gini = (1 - p.mean(0).pow(2).sum(-1)).mean()
        loss = clf_s + clf_h + cfg.lam_center * jcl + cfg.lam_gini * gini - cfg.lam_batch_gini * batch_gini
        with torch.no_grad():
            acc = (hard_logits.argmax(-1) == labels).float().mean()
        return {"loss": loss, "clf_soft": clf_s, "clf_hard": clf_h, "jcl": jcl, "gini": gini,
                "batch_gini": batch_gini, "acc": acc}

    @torch.no_grad()
    def codes_from_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.assignment_logits(x).argmax(-1).to(code_dtype(self.cfg.K))

    @torch.no_grad()
    def tables_from_features(self, x: torch.Tensor) -> torch.Tensor:
        """Asymmetric tables (B, M, K): -||soft_qm - C_m[:, k]||^2."""
        soft = torch.einsum("mdk,bmk->bmd", self.C, self.assignment_logits(x).softmax(-1))
        cross = torch.einsum("bmd,mdk->bmk", soft, self.C)
        return -(soft.pow(2).sum(-1, keepdim=True) - 2 * cross + self.C.pow(2).sum(1).unsqueeze(0))


@dataclass(frozen=True)
class DCDHConfig(_ConfigMixin):
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


def hamming_distances(query_codes: torch.Tensor, db_codes: torch.Tensor) -> torch.Tensor:
    """Hamming distances (nq, N) between 0/1 codes, via +-1 inner products: (L - <a, b>) / 2."""
    if query_codes.shape[1] != db_codes.shape[1]:
        raise ValueError(f"code lengths differ: {query_codes.shape[1]} vs {db_codes.shape[1]}")
    a = query_codes.float() * 2 - 1
    b = db_codes.float() * 2 - 1
    return ((a.shape[1] - a @ b.T) / 2).round().to(torch.int32)
