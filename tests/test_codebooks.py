import math

import numpy as np
import pytest
import scipy.fft
import torch

from model.codebooks import orthonormal_codebooks

# (D, M, K) for every configuration in the paper: 16..64 bit, D=512 for small sets,
# D=516 at 36 bit, and square codebooks D = M*K.
PAPER_CONFIGS = [
    (512, 2, 256),   # 16 bit
    (512, 4, 64), (256, 4, 64), (768, 3, 256),  # 24 bit
    (1024, 4, 256),  # 32 bit
    (516, 6, 64), (384, 6, 64), (2048, 4, 512),  # 36 bit (D=516 and square)
    (512, 8, 64), (1536, 6, 256),  # 48 bit
    (2048, 8, 256),  # 64 bit
]


def independent_codebooks(D, M, K):
    """Algorithm 1 from scipy's orthonormal DCT-II matrix T: A = T^T (basis vectors as columns)."""
    d = D // M
    T = scipy.fft.dct(np.eye(d), type=2, norm="ortho", axis=0)
    A = T.T
    books = [A[:, :K]]
    for _ in range(1, M):
        books.append(A @ books[-1])
    return np.stack(books)


@pytest.mark.parametrize("D,M,K", PAPER_CONFIGS)
def test_codebooks_match_dct_and_are_orthonormal(D, M, K):
    C = orthonormal_codebooks(D, M, K)
    assert C.shape == (M, D // M, K) and C.dtype == torch.float32
    np.testing.assert_allclose(C.numpy(), independent_codebooks(D, M, K), atol=1e-6)
    eye = torch.eye(K)
    for m in range(M):
        assert torch.allclose(C[m].T @ C[m], eye, atol=1e-5), f"C_{m}^T C_{m} != I"


def test_first_codebook_is_scaled_dct_columns():
    d = 8
    C = orthonormal_codebooks(d, 1, d, dtype=torch.float64)[0]
    i = 3
    assert C[i, 0].item() == pytest.approx(math.sqrt(2 / d) / math.sqrt(2))
    assert C[i, 2].item() == pytest.approx(math.sqrt(2 / d) * math.cos(math.pi * 2 * (i + 0.5) / d))


def test_codebooks_are_deterministic_and_distinct_per_subspace():
    a, b = orthonormal_codebooks(1024, 4, 256), orthonormal_codebooks(1024, 4, 256)
    assert torch.equal(a, b)
    assert not torch.allclose(a[0], a[1])


@pytest.mark.parametrize("D,M,K,match", [(500, 3, 64, "not divisible"), (512, 4, 256, "K <= D/M"), (0, 1, 1, "positive")])
def test_bad_shapes_are_clear_errors(D, M, K, match):
    with pytest.raises(ValueError, match=match):
        orthonormal_codebooks(D, M, K)
