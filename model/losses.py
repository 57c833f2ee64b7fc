"""OPQN training loss (Eq. 6-10): subspace CosFace on x and on s with a shared W_m, plus entropy.

Sharing W_m between the feature branch and the soft-quantization branch is what pulls the
quantized vector towards the class direction of its feature; the entropy term pushes each
soft assignment p_m towards one codeword so the argmax code loses little. ``cfg`` is the
network's ``model.opqn.OPQNConfig``.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def class_logits(v: torch.Tensor, W: torch.Tensor, cfg) -> torch.Tensor:
    """Per-group logits (B, G, classes) of v (B, G, dg) against W (G, dg, classes).

    CosFace: cosines of normalised vectors and normalised class columns, clamped to [-1, 1]
    (margin and scale are applied in ``margin_cross_entropy``). Plain softmax: raw products.
    """
    if cfg.margin_loss == "softmax":
        return torch.einsum("bgd,gdc->bgc", v, W)
    cos = torch.einsum("bgd,gdc->bgc", F.normalize(v, dim=-1), F.normalize(W, dim=1))
    return cos.clamp(-1.0, 1.0)


def margin_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, cfg) -> torch.Tensor:
    """Mean over groups of the batch-mean CE; CosFace logits r*(cos - u) for the true class."""
    if cfg.margin_loss == "cosface":
        onehot = F.one_hot(labels, logits.shape[-1]).to(logits.dtype).unsqueeze(1)
        logits = cfg.r * (logits - cfg.u * onehot)
    groups = logits.shape[1]
    # Every group sees the same batch, so the mean over (batch, group) equals the mean over
    # groups of the per-group batch means.
    return F.cross_entropy(logits.permute(0, 2, 1), labels.unsqueeze(1).expand(-1, groups))


def assignment_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Mean over samples and subspaces of the entropy of p_m = softmax(logits)."""
    logp = logits.log_softmax(-1)
    return -(logp.exp() * logp).sum(-1).mean()


def usage_deficit(p: torch.Tensor) -> torch.Tensor:
    """log K minus the entropy of the batch's mean assignment, averaged over subspaces.

    The per-sample entropy term makes each face pick one codeword firmly, but nothing stops
    many faces from picking the same one; on faces unlike the training set that ends in a few
    "sink" codes holding most of a gallery. Zero when the batch uses every codeword equally.
    """
    mean = p.mean(0).clamp_min(1e-12)  # (M, K)
    return (math.log(p.shape[-1]) + (mean * mean.log()).sum(-1)).mean()


def opqn_loss(out: dict[str, torch.Tensor], labels: torch.Tensor, W: torch.Tensor,
              cfg) -> dict[str, torch.Tensor]:
    """L = L_clf + lambda * L_ent (+ balance * usage deficit), with its parts and the x-branch accuracy."""
    xs, s = out["xs"], out["s"]
    if cfg.classifier == "concat":
        xs, s = xs.reshape(xs.shape[0], 1, -1), s.reshape(s.shape[0], 1, -1)
    x_logits = class_logits(xs, W, cfg)
    s_logits = class_logits(s, W, cfg)
    clf_x = margin_cross_entropy(x_logits, labels, cfg)
    clf_s = margin_cross_entropy(s_logits, labels, cfg)
    clf = clf_s if cfg.loss_branches == "s" else 0.5 * (clf_x + clf_s)
    entropy = assignment_entropy(out["logits"])
    loss = clf + cfg.lam * entropy
    parts = {}
    if cfg.balance:
        parts["usage_deficit"] = usage_deficit(out["p"])
        loss = loss + cfg.balance * parts["usage_deficit"]
    with torch.no_grad():
        acc = (x_logits.sum(1).argmax(-1) == labels).float().mean()
    return {"loss": loss, "clf": clf, "clf_x": clf_x, "clf_s": clf_s, "entropy": entropy, "acc": acc, **parts}


class WithLoss(torch.nn.Module):
    """A network (OPQN, DPQ, DCDH) and its ``training_loss`` as one module: what a trainer steps.

    DDP synchronises the gradients of parameters used inside ``forward``; class weights and
    centres are only used by the loss, so the loss belongs inside the wrapped forward.
    """

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.net.training_loss(self.net(images), labels)
