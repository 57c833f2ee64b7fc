"""Evaluate a model on query/database face sets: quantized OPQN retrieval and the float baseline.

The float baseline (cosine of the unquantized features of the same model) is the upper
bound the codes are measured against.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from model.code_spread import code_spread
from model.metrics import retrieval_metrics
from model.opqn import OPQN
from model.scoring import lut_scores


def to_unit_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 or float pixel values in [0, 255] -> the network's input range [-1, 1] (training
    and inference scale pixels with this one function)."""
    return images.float().div(127.5).sub(1.0)


def to_input(images: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 (N, C, E, E) -> float in [-1, 1], centre-cropped to ``size``."""
    e = images.shape[-1]
    off = (e - size) // 2
    return to_unit_range(images[..., off:off + size, off:off + size])


@torch.no_grad()
def embed(model: OPQN, images: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    model.eval()
    size = model.cfg.image_size
    return torch.cat([model.features(to_input(images[i:i + batch_size], size))
                      for i in range(0, len(images), batch_size)]) if len(images) else torch.empty(0, model.cfg.D)


@torch.no_grad()
def evaluate_retrieval(model: OPQN, queries, database, ts=(1, 5, 10, 20, 50, 100)) -> dict:
    """Quantized (codes + query tables) and float-feature metrics on FaceSet-like inputs, with the
    database codes' spread (``model.code_spread``; ``largest_bucket`` and ``code_entropy_bits``
    also at the top level)."""
    xq, xd = embed(model, queries.images), embed(model, database.images)
    scores = lut_scores(model.tables_from_features(xq), model.codes_from_features(xd))
    quant = retrieval_metrics(scores.numpy(), queries.labels, database.labels, ts)
    cos = F.normalize(xq, dim=1) @ F.normalize(xd, dim=1).T
    flt = retrieval_metrics(cos.numpy(), queries.labels, database.labels, ts)
    spread = code_spread(model.codes_from_features(xd).numpy(), model.cfg.K)  # database codes: a sink code?
    return {
        "map": quant["map"], "p5": quant["precision_at"].get(5), "precision_at": quant["precision_at"],
        "map_float": flt["map"], "p5_float": flt["precision_at"].get(5),
        "queries": quant["queries"], "database": quant["database"],
        "codewords_used_per_subspace": spread["codewords_used_mean"], "pr": quant["pr"], "pr_float": flt["pr"],
        "largest_bucket": spread["largest_bucket"], "code_entropy_bits": spread["code_entropy_bits"],
        "code_spread": spread,
    }
