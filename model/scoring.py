"""Scoring codes against query tables (OPQN Eq. 17-18).

With orthonormal codebooks, ||s_q - C_m e_b||^2 = ||p||^2 - 2 p[b] + 1 per subspace, so the
asymmetric distance ranks exactly like score(q, i) = sum_m P_q[m, b_im]: M table look-ups
per database face, nothing else.
"""
from __future__ import annotations

import torch


def lut_scores(tables: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """scores[q, i] = sum_m tables[q, m, codes[i, m]]; tables (nq, M, K), codes (N, M) -> (nq, N)."""
    if tables.dim() != 3 or codes.dim() != 2:
        raise ValueError(f"expected tables (nq, M, K) and codes (N, M), got {tuple(tables.shape)} and {tuple(codes.shape)}")
    nq, M, K = tables.shape
    if codes.shape[1] != M:
        raise ValueError(f"codes have {codes.shape[1]} subspaces but tables have M={M}")
    idx = codes.long()
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= K):
        raise ValueError(f"codes must lie in [0, {K}), got values in [{int(idx.min())}, {int(idx.max())}]")
    scores = tables.new_zeros(nq, codes.shape[0])
    for m in range(M):
        scores += tables[:, m, :][:, idx[:, m]]
    return scores


def reconstruct(codebooks: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """Concatenated codewords C_m[:, b_m] for each code (N, M) -> (N, D)."""
    M = codebooks.shape[0]
    parts = [codebooks[m][:, codes[:, m].long()].T for m in range(M)]
    return torch.cat(parts, dim=1)


def soft_quantization(codebooks: torch.Tensor, tables: torch.Tensor) -> torch.Tensor:
    """s_q = concat_m C_m P_q[m], (nq, M, K) -> (nq, D)."""
    return torch.einsum("mdk,qmk->qmd", codebooks, tables).reshape(tables.shape[0], -1)


def asymmetric_distances(codebooks: torch.Tensor, tables: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """Eq. 17: squared distance between each query's soft quantization and each reconstruction."""
    return torch.cdist(soft_quantization(codebooks, tables), reconstruct(codebooks, codes)).pow(2)
