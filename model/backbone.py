"""The paper's ResNet20 backbone (SphereFace-20 style, OPQN Fig. 3).

Four stages of 64/128/256/512 channels with 1/2/4/1 residual units. Each stage opens with a
3x3 conv (stride 2; stride 1 in the first stage for small inputs) -> BN -> PReLU. The head
is flatten -> BN1d -> Dropout -> Linear(-> D) -> BN1d, whose output is the feature x.
``width`` scales every channel count so the same architecture trains on a CPU
(0.25 -> 16/32/64/128 channels); width 1.0 is the paper's network.
"""
from __future__ import annotations

import torch
from torch import nn

STAGE_CHANNELS = (64, 128, 256, 512)
STAGE_UNITS = (1, 2, 4, 1)


def first_stride(image_size: int) -> int:
    """Stride of the first stage: 1 for small crops (32 px keeps a 4x4 map), else 2."""
    return 1 if image_size < 64 else 2


def _conv_out(n: int, stride: int) -> int:
    return (n + 2 - 3) // stride + 1


class ResidualUnit(nn.Module):
    """x + PReLU(BN(conv(PReLU(BN(conv(x)))))), identity shortcut."""

    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, channels, 3, 1, 1, bias=False),
            nn.BatchNorm2d(channels),
            nn.PReLU(channels),
            nn.Conv2d(channels, channels, 3, 1, 1, bias=False),
            nn.BatchNorm2d(channels),
            nn.PReLU(channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class ResNet20(nn.Module):
    def __init__(self, feature_dim: int, image_size: int = 112, width: float = 1.0,
                 in_channels: int = 3, dropout: float = 0.5):
        super().__init__()
        if image_size < 16:
            raise ValueError(f"image_size={image_size} is too small for four conv stages (need >= 16)")
        if width <= 0:
            raise ValueError(f"width multiplier must be positive, got {width}")
        channels = [max(4, int(round(c * width))) for c in STAGE_CHANNELS]
        layers: list[nn.Module] = []
        prev, size = in_channels, image_size
        for stage, (ch, units) in enumerate(zip(channels, STAGE_UNITS)):
            stride = first_stride(image_size) if stage == 0 else 2
            layers += [nn.Conv2d(prev, ch, 3, stride, 1, bias=False), nn.BatchNorm2d(ch), nn.PReLU(ch)]
            layers += [ResidualUnit(ch) for _ in range(units)]
            prev, size = ch, _conv_out(size, stride)
        self.body = nn.Sequential(*layers)
        flat = prev * size * size
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.BatchNorm1d(flat),
            nn.Dropout(dropout),
            nn.Linear(flat, feature_dim),
            nn.BatchNorm1d(feature_dim),
        )
        self.out_map = (prev, size, size)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(images))
