import numpy as np
import pytest

from model.metrics import rank, retrieval_metrics


def brute_force(scores, ql, dl, ts):
    """Reference: sort with an explicit (−score, index) key, AP and P@T by counting."""
    aps, pts = [], {t: [] for t in ts}
    curves = []
    for q in range(len(ql)):
        order = sorted(range(len(dl)), key=lambda i: (-scores[q][i], i))
        rel = [dl[i] == ql[q] for i in order]
        hits, precs = 0, []
        for k, r in enumerate(rel, start=1):
            if r:
                hits += 1
                precs.append(hits / k)
        aps.append(sum(precs) / hits)
        for t in ts:
            n = min(t, len(dl))
            pts[t].append(sum(rel[:n]) / n)
        curves.append(rel)
    return np.mean(aps), {t: np.mean(v) for t, v in pts.items()}, curves


@pytest.mark.parametrize("seed", range(5))
def test_metrics_match_brute_force_with_ties(seed):
    rng = np.random.default_rng(seed)
    nq, n = 12, 40
    scores = rng.integers(0, 4, size=(nq, n)).astype(np.float32)  # heavy ties, like identical codes
    dl = rng.integers(0, 5, size=n)
    ql = rng.integers(0, 5, size=nq)
    ql[0] = 7  # a label with a single relevant item
    dl[3] = 7
    ts = (1, 5, 10, 100)
    got = retrieval_metrics(scores, ql, dl, ts, chunk=5)
    m, p, curves = brute_force(scores.tolist(), ql.tolist(), dl.tolist(), ts)
    assert got["map"] == pytest.approx(m, abs=1e-12)
    for t in ts:
        assert got["precision_at"][t] == pytest.approx(p[t], abs=1e-12)
    cut = got["pr"]["cutoffs"]
    for j, c in enumerate(cut):
        prec = np.mean([sum(r[:c]) / c for r in curves])
        rec = np.mean([sum(r[:c]) / sum(r) for r in curves])
        assert got["pr"]["precision"][j] == pytest.approx(prec)
        assert got["pr"]["recall"][j] == pytest.approx(rec)
    assert got["pr"]["recall"][-1] == pytest.approx(1.0)


def test_ties_break_by_database_index():
    assert rank(np.array([[1.0, 2.0, 2.0, 1.0]])).tolist() == [[1, 2, 0, 3]]
    # a relevant item tied with an irrelevant one ranks first only if its index is lower
    first = retrieval_metrics(np.array([[1.0, 1.0]]), ["a"], ["a", "b"], ts=(1,))
    second = retrieval_metrics(np.array([[1.0, 1.0]]), ["a"], ["b", "a"], ts=(1,))
    assert first["map"] == 1.0 and second["map"] == 0.5


def test_known_case():
    scores = np.array([[0.9, 0.8, 0.7, 0.6]])
    got = retrieval_metrics(scores, ["x"], ["x", "y", "x", "y"], ts=(1, 2, 4))
    assert got["map"] == pytest.approx((1 / 1 + 2 / 3) / 2)
    assert got["precision_at"] == {1: 1.0, 2: 0.5, 4: 0.5}


def test_query_without_relevant_item_is_an_error_unless_excluded():
    scores = np.random.default_rng(0).random((2, 3))
    with pytest.raises(ValueError, match="no relevant database item"):
        retrieval_metrics(scores, ["a", "z"], ["a", "b", "a"])
    got = retrieval_metrics(scores, ["a", "z"], ["a", "b", "a"], exclude_no_relevant=True)
    assert got["queries"] == 1 and got["excluded_queries"] == 1


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="does not match"):
        retrieval_metrics(np.zeros((2, 3)), ["a"], ["a", "b", "c"])
