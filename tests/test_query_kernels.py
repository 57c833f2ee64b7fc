"""Scoring kernels of the query stage: every kernel returns the exhaustive exact top-k."""
import numpy as np
import pyarrow as pa
import pytest
import torch

from model.scoring import lut_scores
from pipelines.formats.gallery import code_numpy_dtype
from pipelines.query import kernels as kn
from pipelines.query.scan import task_count
from pipelines.query.topk import ShardTask, group_shards, merge_topk, split_shards


def make_case(nq, M, K, N, seed, kind="softmax", dup=0.2):
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, K, (N, M)).astype(code_numpy_dtype(K))
    n_dup = int(dup * N)  # identical codes: exact score ties
    codes[rng.choice(N, n_dup, replace=False)] = codes[rng.integers(0, N, n_dup)]
    t = rng.standard_normal((nq, M, K))
    if kind == "softmax":
        tables = np.exp(3 * t) / np.exp(3 * t).sum(-1, keepdims=True)
    elif kind == "wide":
        tables = 50 * t
    else:  # coarse values: many ties between different codes
        tables = np.round(2 * t) / 4
    return tables.astype(np.float32), codes


def brute_force(tables, codes, k):
    """lut_scores over everything, ordered by (score desc, row asc)."""
    scores = lut_scores(torch.from_numpy(tables.copy()), torch.from_numpy(codes.astype(np.int64))).numpy()
    rows = np.arange(len(codes))
    order = [np.lexsort((rows, -scores[q]))[:k] for q in range(len(tables))]
    return np.stack([scores[q, o] for q, o in enumerate(order)]), np.stack(order)


@pytest.mark.parametrize("M,K", [(4, 16), (8, 16), (3, 16), (4, 64), (8, 256), (2, 512)])
@pytest.mark.parametrize("kind", ["softmax", "wide", "coarse"])
def test_every_kernel_equals_brute_force(M, K, kind):
    tables, codes = make_case(9, M, K, 4000, seed=M * K, kind=kind)
    ref_s, ref_r = brute_force(tables, codes, 25)
    names = ["numpy", "torch", "faiss"] + (["fastscan"] if K == 16 else [])
    for name in names + ["auto"]:
        s, r = kn.topk(tables, codes, 25, kernel=name)
        np.testing.assert_array_equal(r, ref_r, err_msg=name)
        np.testing.assert_array_equal(s, ref_s, err_msg=name)  # canonical scores: bit-identical


def test_torch_scores_are_bit_identical_to_lut_scores():
    tables, codes = make_case(5, 8, 256, 20000, seed=3, kind="wide")
    s, r = kn.torch_topk(tables, codes, 20000, block=4096)
    full = lut_scores(torch.from_numpy(tables), torch.from_numpy(codes.astype(np.int64))).numpy()
    np.testing.assert_array_equal(s, np.take_along_axis(full, r, 1))


@pytest.mark.parametrize("nq", [1, 2, 3, 70])
def test_query_counts_and_small_blocks(nq):
    tables, codes = make_case(nq, 4, 64, 3000, seed=nq)
    ref = brute_force(tables, codes, 40)
    for kw in ({"block": 1024}, {"block": 1024, "query_chunk": 16}, {}):
        s, r = kn.torch_topk(tables, codes, 40, **kw)
        np.testing.assert_array_equal(r, ref[1])
    s, r = kn.topk(tables, codes, 40, kernel="auto")
    np.testing.assert_array_equal(r, ref[1])


def test_k_larger_than_block_returns_everything_in_order():
    tables, codes = make_case(3, 4, 16, 50, seed=5)
    for name in kn.KERNELS:
        s, r = kn.topk(tables, codes, 1000, kernel=name)
        assert r.shape == (3, 50)
        np.testing.assert_array_equal(r, brute_force(tables, codes, 50)[1])


def test_empty_inputs():
    tables, codes = make_case(2, 4, 16, 10, seed=6)
    s, r = kn.topk(tables, codes[:0], 5)
    assert s.shape == r.shape == (2, 0)
    s, r = kn.topk(tables[:0], codes, 5)
    assert s.shape == (0, 5)


def test_all_identical_codes_tie_by_row():
    tables, codes = make_case(4, 4, 256, 1000, seed=7)
    codes[:] = codes[0]
    for name in ("torch", "faiss", "numpy"):
        s, r = kn.topk(tables, codes, 10, kernel=name)
        np.testing.assert_array_equal(r, np.tile(np.arange(10), (4, 1)))


def test_fastscan_rerank_goes_deeper_until_certified(monkeypatch):
    """A shallow first candidate list cannot be certified: the kernel deepens it (or scans
    exactly) and still returns the exact top-k; the approximate-score bound holds."""
    tables, codes = make_case(6, 8, 16, 30000, seed=8, dup=0.0)
    ref = brute_force(tables, codes, 50)
    depths, exact_scans = [], []
    original_exact, original_torch = kn.exact_scores, kn.torch_topk
    monkeypatch.setattr(kn, "exact_scores", lambda t, c, r: depths.append(r.shape[1]) or original_exact(t, c, r))
    monkeypatch.setattr(kn, "torch_topk", lambda t, *a, **kw: exact_scans.append(len(t)) or original_torch(t, *a, **kw))
    for depth in (50, 200):
        s, r = kn.faiss_topk(tables, codes, 50, fastscan=True, depth=depth)
        np.testing.assert_array_equal(r, ref[1])
        np.testing.assert_array_equal(s, ref[0])
    assert depths == [50, 200, 200] and not exact_scans  # 50 candidates are not provably enough
    s, r = kn.faiss_topk(tables, codes[:300], 50, fastscan=True, depth=50)
    np.testing.assert_array_equal(r, brute_force(tables, codes[:300], 50)[1])
    assert exact_scans  # 4 x 50 candidates would exceed half the block: exact scan instead
    index = kn.faiss_index(codes, 16, fastscan=True)
    approx, rows = index.search(kn.faiss_queries(tables), 500)
    exact = kn.exact_scores(tables, codes, rows.astype(np.int64))
    assert (np.abs(approx - exact).max(1) < kn.error_bound(tables, fastscan=True)).all()


def test_faiss_lookup_table_trick_reproduces_any_table():
    tables, codes = make_case(3, 4, 64, 500, seed=9, kind="wide")
    index = kn.faiss_index(codes, 64)
    approx, rows = index.search(kn.faiss_queries(tables), 500)
    exact = kn.exact_scores(tables, codes, rows.astype(np.int64))
    assert (np.abs(approx - exact).max(1) < kn.error_bound(tables, fastscan=False)).all()


def test_read_only_inputs_are_accepted():
    tables, codes = make_case(5, 4, 64, 500, seed=10)
    tables.setflags(write=False)
    codes.setflags(write=False)
    s, r = kn.topk(tables, codes, 7, kernel="torch")
    np.testing.assert_array_equal(r, brute_force(tables, codes, 7)[1])


def test_bad_inputs_are_refused():
    tables, codes = make_case(2, 4, 64, 10, seed=11)
    with pytest.raises(ValueError, match="subspaces"):
        kn.topk(tables, codes[:, :3], 5)
    with pytest.raises(ValueError, match="K = 16"):
        kn.topk(tables, codes, 5, kernel="fastscan")
    with pytest.raises(ValueError, match="unknown kernel"):
        kn.topk(tables, codes, 5, kernel="gpu")
    with pytest.raises(ValueError, match=r"\[0, 16\)"):
        kn.topk(tables[:, :, :16], codes + 20, 5)


def test_merge_uses_shard_then_row_for_ties_whatever_the_order():
    def part(shard, rows, scores):
        return pa.table({"query": pa.array([0] * len(rows), pa.int32()), "score": pa.array(scores, pa.float32()),
                         "shard": pa.array([shard] * len(rows), pa.int32()), "row": pa.array(rows, pa.int64()),
                         "face_id": [f"{shard}-{r}" for r in rows]})
    a, b, c = part(2, [0, 5], [1.0, 0.5]), part(0, [7, 9], [1.0, 1.0]), part(1, [3], [1.0])
    for parts in ([a, b, c], [c, b, a], [b, merge_topk([c, a], 3)]):
        got = merge_topk(parts, 3).column("face_id").to_pylist()
        assert got == ["0-7", "0-9", "1-3"]


def test_group_shards_keeps_order_and_bounds():
    shards = [ShardTask(i, f"u{i}", n) for i, n in enumerate([5, 5, 20, 1, 1, 1, 0])]
    groups = group_shards(shards, 10)
    assert [[s.index for s in g] for g in groups] == [[0, 1], [2], [3, 4, 5, 6]]
    assert [[s.index for s in g] for g in group_shards(shards, 100, 2)] == [[0, 1], [2, 3], [4, 5], [6]]


def test_split_shards_gives_runs_of_about_equal_codes_in_order():
    shards = [ShardTask(i, f"u{i}", n) for i, n in enumerate([100] * 10 + [0, 100])]
    groups = split_shards(shards, 3)
    assert [s.index for g in groups for s in g] == list(range(12))  # every shard once, in order
    assert [sum(s.rows for s in g) for g in groups] == [400, 300, 400]
    assert [len(g) for g in split_shards(shards, 3, 2)] == [2, 2, 2, 1, 2, 2, 1]  # each run cut in twos
    assert split_shards(shards[:1], 5) == [shards[:1]] and split_shards([], 3) == []


def test_task_count_fills_the_slots_in_whole_rounds_and_bounds_task_length():
    # 64 queries, 10 bytes a code: 1.64e-7 s a code at the stated rates, so a 5 s task holds ~30M codes
    assert task_count(10**9, 10, 64, 16, 5.0) == 48  # 34 tasks of <= 5 s, rounded up to 3 rounds of 16
    assert task_count(60 * 10**6, 10, 64, 16, 5.0) == 32  # two tasks per slot (~0.6 s each, above 0.5 s)
    assert task_count(10**6, 10, 64, 16, 5.0) == 1  # one short task: more would be shorter than 0.5 s
    assert task_count(0, 10, 64, 16, 5.0) == 1
    assert task_count(10**7, 10, 10_000, 4, 5.0) == 24  # many queries: 101 s of work, 21 tasks, 6 rounds of 4
