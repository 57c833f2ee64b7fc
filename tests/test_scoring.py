import faiss
import numpy as np
import pytest
import torch

from model.codebooks import orthonormal_codebooks
from model.scoring import asymmetric_distances, lut_scores


def random_tables(nq, M, K, gen):
    return torch.randn(nq, M, K, generator=gen).mul(3).softmax(-1)


def random_codes(N, M, K, gen):
    dtype = torch.uint8 if K <= 256 else torch.int32
    return torch.randint(0, K, (N, M), generator=gen).to(dtype)


def test_lut_scores_is_sum_of_table_lookups():
    gen = torch.Generator().manual_seed(0)
    tables, codes = random_tables(3, 4, 16, gen), random_codes(50, 4, 16, gen)
    scores = lut_scores(tables, codes)
    for q in range(3):
        for i in range(50):
            expected = sum(tables[q, m, int(codes[i, m])] for m in range(4))
            assert scores[q, i].item() == pytest.approx(expected.item(), abs=1e-6)


@pytest.mark.parametrize("D,M,K", [(512, 2, 256), (1024, 4, 256), (512, 8, 64), (2048, 4, 512)])
def test_argmin_asymmetric_distance_equals_argmax_lut_score(D, M, K):
    gen = torch.Generator().manual_seed(1)
    C = orthonormal_codebooks(D, M, K, dtype=torch.float64)
    tables = random_tables(20, M, K, gen).double()
    codes = random_codes(300, M, K, gen)
    dist = asymmetric_distances(C, tables, codes)
    scores = lut_scores(tables, codes)
    # Orthonormal codebooks: ||s_q - c||^2 = const_q - 2 * score(q, i), exactly.
    const = (tables ** 2).sum(dim=(1, 2)) + M
    torch.testing.assert_close(dist, const[:, None] - 2 * scores, atol=1e-9, rtol=0)
    assert torch.equal(dist.argmin(1), scores.argmax(1))


def faiss_pq_index(C: torch.Tensor, codes: np.ndarray) -> faiss.IndexPQ:
    """IndexPQ (inner product) with OPQN's fixed codebooks loaded and the stored codes added."""
    M, d, K = C.shape
    index = faiss.IndexPQ(M * d, M, int(np.log2(K)), faiss.METRIC_INNER_PRODUCT)
    centroids = C.permute(0, 2, 1).contiguous().numpy().astype(np.float32)  # (M, K, d)
    faiss.copy_array_to_vector(centroids.ravel(), index.pq.centroids)
    index.is_trained = True
    # faiss packs log2(K)-bit codes into bytes (identity for K = 256).
    index.add_sa_codes(faiss.pack_bitstrings(codes.astype(np.int32), int(np.log2(K))))
    return index


@pytest.mark.parametrize("D,M,K", [(1024, 4, 256), (512, 8, 64), (512, 2, 256), (2048, 4, 512)])
def test_faiss_index_pq_with_fixed_codebooks_matches_lut_scores(D, M, K):
    gen = torch.Generator().manual_seed(2)
    C = orthonormal_codebooks(D, M, K)
    tables = random_tables(7, M, K, gen)
    codes = random_codes(2000, M, K, gen)
    index = faiss_pq_index(C, codes.numpy())
    # q_m = C_m P_q[m] makes faiss's lookup table <q_m, c_mk> equal P_q[m, k].
    queries = torch.einsum("mdk,qmk->qmd", C, tables).reshape(7, -1).numpy()
    faiss_scores, faiss_ids = index.search(queries, index.ntotal)
    ours = lut_scores(tables, codes).numpy()
    np.testing.assert_allclose(np.take_along_axis(ours, faiss_ids, axis=1), faiss_scores, atol=1e-5)


def test_lut_scores_rejects_mismatched_shapes_and_out_of_range_codes():
    tables = torch.rand(2, 4, 16)
    with pytest.raises(ValueError, match="subspaces"):
        lut_scores(tables, torch.zeros(5, 3, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"\[0, 16\)"):
        lut_scores(tables, torch.full((5, 4), 16, dtype=torch.uint8))
