"""Predefined orthonormal codebooks (OPQN Algorithm 1).

The codewords are never trained: they are columns of a DCT-II basis rotated once more for
every further subspace, so every codebook is orthonormal (C_m^T C_m = I) and depends only on
(D, M, K). Any two runs, shards or galleries with the same (D, M, K) share them, which is
what lets a code shard name its model by (D, M, K) alone.
"""
from __future__ import annotations

import math

import torch


def dct_basis(d: int) -> torch.Tensor:
    """Orthogonal DCT-II basis as columns: A[i, j] = cos(pi * j * (i + 1/2) / d), scaled."""
    i = torch.arange(d, dtype=torch.float64).unsqueeze(1)
    j = torch.arange(d, dtype=torch.float64).unsqueeze(0)
    a = torch.cos(math.pi * j * (i + 0.5) / d)
    a[:, 0] *= 1.0 / math.sqrt(2.0)
    return a * math.sqrt(2.0 / d)


def check_shape(D: int, M: int, K: int) -> int:
    """Validate (D, M, K) and return the sub-vector size d = D // M."""
    for name, value in (("D", D), ("M", M), ("K", K)):
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if D % M != 0:
        raise ValueError(f"D={D} is not divisible by M={M}: each of the M subspaces needs D/M dimensions")
    d = D // M
    if K > d:
        raise ValueError(
            f"K={K} codewords cannot be orthonormal in d=D/M={d} dimensions (need K <= D/M); "
            f"raise D to at least M*K={M * K}"
        )
    return d


def orthonormal_codebooks(D: int, M: int, K: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Codebooks of shape (M, D // M, K): C_1 = A[:, :K], C_m = A @ C_{m-1}.

    Computed in float64 and cast once, so float32 codebooks are orthonormal to ~1e-7.
    """
    d = check_shape(D, M, K)
    a = dct_basis(d)
    books = [a[:, :K]]
    for _ in range(1, M):
        books.append(a @ books[-1])
    return torch.stack(books).to(dtype)

