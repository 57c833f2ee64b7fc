"""Model inputs from encoded face crops, the same way everywhere a trained model is applied.

Training crops ``image_size`` pixels at random from faces stored at ``enlarge`` x that size;
encoding, querying and evaluation use the centre crop of the same enlarged face, so codes
and query tables see faces exactly as training did.
"""
from __future__ import annotations

import torch

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
