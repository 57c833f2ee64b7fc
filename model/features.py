"""The backbone feature outside training: pixel scaling, batched embedding, l2-normalised copies.

Training, encoding, querying and evaluation all scale pixels with ``to_unit_range`` and take
the same centre crop (``to_input``), so a face is seen exactly as training saw it. The
l2-normalised feature is the float upper bound evaluation takes the cosine of, what refine
codes quantize, and (in float16) what a gallery stores for exact re-ranking.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def to_unit_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 or float pixel values in [0, 255] -> the network's input range [-1, 1]."""
    return images.float().div(127.5).sub(1.0)


def to_input(images: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 (N, C, E, E) -> float in [-1, 1], centre-cropped to ``size``."""
    e = images.shape[-1]
    off = (e - size) // 2
    return to_unit_range(images[..., off:off + size, off:off + size])


@torch.no_grad()
def embed(model: torch.nn.Module, images: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """Backbone features x (N, D) of stored uint8 faces (N, C, E, E), any network, in eval mode."""
    model.eval()
    size = model.cfg.image_size
    return torch.cat([model.features(to_input(images[i:i + batch_size], size))
                      for i in range(0, len(images), batch_size)]) if len(images) else torch.empty(0, model.cfg.D)


def normalized_feature(x: torch.Tensor) -> np.ndarray:
    """Features x (N, D) -> the l2-normalised float32 feature (evaluation's float upper bound
    takes its cosine; refine codes quantize it)."""
    return F.normalize(x.float(), dim=1).cpu().numpy()


def stored_feature(x: torch.Tensor) -> np.ndarray:
    """Features x (N, D) -> what a gallery stores for re-ranking: l2-normalised, float16.

    The same vector evaluation's float upper bound uses (``F.normalize`` of the backbone
    feature), rounded to half precision to halve the bytes (2 * D bytes per face).
    """
    return normalized_feature(x).astype(np.float16)


def exact_cosine(queries: np.ndarray, stored: np.ndarray) -> np.ndarray:
    """Re-rank scores: cosine of each query feature row with the stored feature in the same row.

    ``queries`` (n, D) any float (the model's features), ``stored`` (n, D) float16 as stored.
    Both sides are normalised and the dot product is taken in float64, then rounded to
    float32, so a pair's score does not depend on how pairs are batched.
    """
    q = np.asarray(queries, dtype=np.float64)
    s = np.asarray(stored, dtype=np.float64)
    q = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
    s = s / np.maximum(np.linalg.norm(s, axis=1, keepdims=True), 1e-12)
    return np.einsum("ij,ij->i", q, s).astype(np.float32)
