"""DPQ: learned product quantization, an OPQN baseline on the same ResNet20 backbone.

Klein & Wolf, "End-to-End Supervised Product Quantization for Image Search and Retrieval",
CVPR 2019, compact version. Per subspace m, learned codewords ``C_m`` (K x d)
and a bias-free linear map give a soft assignment ``p_m = softmax(x_m F_m)``; the soft
representation is ``soft_m = C_m p_m``, the hard one the codeword of ``argmax p_m`` passed
through a straight-through estimator (forward: hard codeword, backward: gradient of soft).
Loss: softmax cross-entropy of one linear classifier on the soft and on the hard
representation, the Joint Central Loss (soft and hard pulled to the *same* class centre),
and the Gini terms (each p_m peaked, the batch-mean p_m spread). Retrieval is asymmetric:
the query's soft representation against the database's hard codewords,
``score = -sum_m ||soft_qm - C_m[b_im]||^2`` (M table look-ups, like OPQN).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from model.backbone import ResNet20
from model.config import CodeShape, ConfigDict
from model.opqn import code_dtype
from model.scoring import lut_scores


@dataclass(frozen=True)
class DPQConfig(CodeShape, ConfigDict):
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

    @torch.no_grad()
    def scores(self, xq: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """Query features (nq, D) against database codes (N, M): the asymmetric tables summed, (nq, N)."""
        return lut_scores(self.tables_from_features(xq), codes)
