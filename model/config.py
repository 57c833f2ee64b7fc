"""What every network config shares: a dict round trip for checkpoints, and the PQ code shape.

Configs are stored verbatim in checkpoints (``to_dict``) and rebuilt from them
(``from_dict``); an unknown key is an error, so a checkpoint of one network is never
silently read as another's config.
"""
from __future__ import annotations

import math
from dataclasses import asdict, fields

from model.codebooks import check_shape


class ConfigDict:
    """``to_dict`` / ``from_dict`` for a frozen dataclass config."""

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict):
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown {cls.__name__} keys: {unknown}")
        return cls(**values)


class CodeShape:
    """Shared by every product-quantization config (OPQN, DPQ): D = M*K when 0, shape checks,
    sub-vector size d and code length in bits. Expects fields num_classes, M, K, D."""

    def _check_code_shape(self) -> None:
        if self.D == 0:
            object.__setattr__(self, "D", self.M * self.K)
        check_shape(self.D, self.M, self.K)
        if self.num_classes < 2:
            raise ValueError(f"num_classes must be >= 2 to train a classifier, got {self.num_classes}")

    @property
    def d(self) -> int:
        return self.D // self.M

    @property
    def bits(self) -> float:
        return self.M * math.log2(self.K)
