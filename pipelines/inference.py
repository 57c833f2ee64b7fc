"""Model inputs from encoded face crops, the same way everywhere a trained model is applied.

Training crops ``image_size`` pixels at random from faces stored at ``enlarge`` x that size;
encoding, querying and evaluation use the centre crop of the same enlarged face, so codes
and query tables see faces exactly as training did.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from model.opqn import OPQN
from pipelines.faces import decode_batch
from pipelines.retrieval import embed


def stored_size(state: dict) -> int:
    """Side of the decoded face before the centre crop, from a checkpoint's training settings."""
    size = state["config"]["image_size"]
    enlarge = state.get("train", {}).get("enlarge", 1.1)
    return max(size, int(round(size * enlarge)))


@torch.no_grad()
def features_from_images(model: OPQN, images, size: int, batch_size: int = 512) -> torch.Tensor:
    """Encoded crops (bytes) -> bottleneck features x (N, D)."""
    return embed(model, torch.from_numpy(decode_batch(list(images), size)), batch_size)


@torch.no_grad()
def codes_from_images(model: OPQN, images, size: int) -> torch.Tensor:
    return model.codes_from_features(features_from_images(model, images, size))


@torch.no_grad()
def tables_from_images(model: OPQN, images, size: int) -> torch.Tensor:
    return model.tables_from_features(features_from_images(model, images, size))


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
