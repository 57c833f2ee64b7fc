"""Scoring kernels: the top-k codes of one block for every query table, exactly.

The score of gallery code ``b`` for query table ``P`` (M x K) is OPQN's Eq. 18,
``score = sum_m P[m, b_m]``, defined here as the float32 sum taken in subspace order
(``((P[0, b_0] + P[1, b_1]) + P[2, b_2]) + ...``), bit for bit what
``model.scoring.lut_scores`` computes. Every kernel returns these canonical scores, so the
ranking (score desc, then row asc) does not depend on the kernel, the block size or where a
block starts.

Kernels (``topk(tables, codes, k, kernel=...)``):

- ``torch``: fused gather-sum with ``torch.nn.functional.embedding_bag`` (one bag of M rows of
  the transposed table per code, many queries at once), then a running per-query threshold so
  only codes that can still enter the top-k leave the kernel. Runs on the GPU when given a CUDA
  device (``auto`` picks it when ``torch.cuda.is_available()``), on the CPU otherwise; its
  scores are bit-identical to ``lut_scores`` on the CPU.
- ``faiss``: faiss ``IndexPQ`` (inner product) with square orthonormal DCT codebooks
  (d = K) and the stored codes added with ``add_sa_codes``. The query vector
  ``q_m = C_m P[m]`` makes faiss's lookup table equal P up to rounding, for any table, so the
  model's own codebooks are not needed. Candidates are re-scored exactly (certified re-rank).
- ``fastscan``: faiss ``IndexPQFastScan`` for 4-bit codes (K = 16): its lookup table is
  quantized to 8 bits, so it proposes candidates and they are re-scored exactly.
- ``numpy``: the plain reference (full score matrix); for tests and benchmarks.
- ``auto``: CUDA -> torch on the GPU; K = 16 -> fastscan; fewer than 4 queries -> faiss
  (the batched gather-sum needs several queries to pay off); else torch on the CPU.

Certified re-rank (faiss and fastscan): search ``k'`` candidates with the approximate
kernel, score them exactly, and accept the top-k of the candidates only when the k-th exact
score is strictly above ``a + eps``, where ``a`` is the lowest approximate score returned and
``eps`` bounds |approximate - exact| for that query (float rounding of faiss's table and sum;
for fast-scan also half an 8-bit quantization step per subspace). Every code left out then
scores strictly below the k-th, so the result equals an exhaustive exact scan, ties included.
The first ``k'`` is ``k + max(16, k/4)`` for IndexPQ (its error is float rounding: only ties
need more) and ``max(4k, 256)`` for fast-scan. Queries that fail the test are searched again
with 4x the candidates, and scanned exactly by the torch kernel once ``k'`` would reach half
the block.
"""
from __future__ import annotations

import functools
import math

import numpy as np
import torch
import torch.nn.functional as F

KERNELS = ("auto", "torch", "faiss", "fastscan", "numpy")

_U = 2.0 ** -24  # float32 unit roundoff
QUERY_CHUNK = 64  # queries per embedding_bag pass: the transposed tables stay in cache
MIN_RERANK_DEPTH = 256


def check_inputs(tables: np.ndarray, codes: np.ndarray) -> tuple[int, int, int]:
    if tables.ndim != 3 or codes.ndim != 2:
        raise ValueError(f"expected tables (nq, M, K) and codes (N, M), got shapes {tables.shape} and {codes.shape}")
    nq, M, K = tables.shape
    if codes.shape[1] != M:
        raise ValueError(f"codes have {codes.shape[1]} subspaces but the query tables have M={M}")
    if codes.dtype.kind not in "ui":
        raise ValueError(f"codes must be integers, got {codes.dtype}")
    if codes.size and codes.dtype.kind == "i" and int(codes.min()) < 0:
        raise ValueError(f"codes must lie in [0, {K}), found {int(codes.min())}")
    if codes.size and K <= np.iinfo(codes.dtype).max and int(codes.max()) >= K:
        raise ValueError(f"codes must lie in [0, {K}), found {int(codes.max())}")
    return nq, M, K


def choose_kernel(kernel: str, nq: int, K: int) -> str:
    if kernel not in KERNELS:
        raise ValueError(f"unknown kernel {kernel!r}; choose from {KERNELS}")
    if kernel != "auto":
        return kernel
    if torch.cuda.is_available():
        return "torch"
    if K == 16:
        return "fastscan"
    if nq < 4 and _is_pow2(K):
        return "faiss"
    return "torch"


def topk(tables: np.ndarray, codes: np.ndarray, k: int, kernel: str = "auto",
         device: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Best ``min(k, N)`` codes for every query: ``(scores (nq, kk) float32, rows (nq, kk) int64)``,
    each row ordered by score desc then row asc, scores canonical (see the module docstring).

    ``tables``: (nq, M, K) float; ``codes``: (N, M) unsigned integers < K.
    """
    tables = np.ascontiguousarray(tables, dtype=np.float32)
    nq, M, K = check_inputs(tables, codes)
    kk = min(int(k), len(codes))
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if nq == 0 or kk == 0:
        return np.empty((nq, kk), np.float32), np.empty((nq, kk), np.int64)
    name = check_kernel(choose_kernel(kernel, nq, K), K)
    if name == "torch":
        return torch_topk(tables, codes, kk, device)
    if name == "numpy":
        return select_topk(numpy_scores(tables, codes), kk)
    return faiss_topk(tables, codes, kk, fastscan=name == "fastscan")


def check_kernel(name: str, K: int) -> str:
    """Refuse a kernel that cannot score K-codeword codes; returns ``name``."""
    if name not in KERNELS:
        raise ValueError(f"unknown kernel {name!r}; choose from {KERNELS}")
    if name == "fastscan" and K != 16:
        raise ValueError(f"the fastscan kernel needs 4-bit codes (K = 16), the gallery has K = {K}")
    if name in ("faiss", "fastscan") and not _is_pow2(K):
        raise ValueError(f"the {name} kernel needs K to be a power of two, got K = {K}")
    return name


# --------------------------------------------------------------------------- reference

def numpy_scores(tables: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """Full (nq, N) canonical score matrix."""
    nq, M, _ = tables.shape
    scores = np.zeros((nq, len(codes)), np.float32)
    for m in range(M):
        scores += tables[:, m, :][:, codes[:, m].astype(np.intp)]
    return scores


def select_topk(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k of each row of a score matrix by (score desc, column asc)."""
    nq, n = scores.shape
    k = min(k, n)
    out_s, out_r = np.empty((nq, k), np.float32), np.empty((nq, k), np.int64)
    for q in range(nq):
        row = scores[q]
        kth = np.partition(row, n - k)[n - k]
        cand = np.flatnonzero(row >= kth)
        order = np.lexsort((cand, -row[cand]))[:k]
        out_r[q] = cand[order]
        out_s[q] = row[out_r[q]]
    return out_s, out_r


def exact_scores(tables: np.ndarray, codes: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Canonical scores of the codes at ``rows`` (nq, n) for their query: (nq, n) float32."""
    nq, M, _ = tables.shape
    q = np.arange(nq)[:, None]
    out = np.zeros(rows.shape, np.float32)
    for m in range(M):
        out += tables[q, m, codes[rows, m].astype(np.intp)]
    return out


# --------------------------------------------------------------------------- torch

class RunningTopK:
    """Per-query best ``k`` (score desc, row asc) over candidates that arrive in any order.

    Candidates are buffered and merged when the buffer is large (or a query still has fewer
    than k), so the threshold lags a little behind: it only ever lets more candidates through.
    """

    def __init__(self, nq: int, k: int):
        self.nq, self.k = nq, k
        self.q = np.empty(0, np.int64)
        self.s = np.empty(0, np.float32)
        self.r = np.empty(0, np.int64)
        self.pending: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self.pending_rows = 0
        self.thr = np.full(nq, -np.inf, np.float32)

    def add(self, q: np.ndarray, s: np.ndarray, r: np.ndarray) -> None:
        self.pending.append((q.astype(np.int64, copy=False), s.astype(np.float32, copy=False),
                             r.astype(np.int64, copy=False)))
        self.pending_rows += len(q)
        if self.pending_rows > self.nq * self.k or np.isneginf(self.thr).any():
            self.merge()

    def merge(self) -> None:
        if not self.pending:
            return
        q = np.concatenate([self.q] + [p[0] for p in self.pending])
        s = np.concatenate([self.s] + [p[1] for p in self.pending])
        r = np.concatenate([self.r] + [p[2] for p in self.pending])
        self.pending, self.pending_rows = [], 0
        order = np.lexsort((r, -s, q))
        q, s, r = q[order], s[order], r[order]
        rank = np.arange(len(q)) - np.searchsorted(q, q, side="left")
        keep = rank < self.k
        self.q, self.s, self.r = q[keep], s[keep], r[keep]
        # the k-th best score per query, -inf while a query has fewer than k
        ends = np.searchsorted(self.q, np.arange(self.nq), side="right")
        full = ends - np.searchsorted(self.q, np.arange(self.nq), side="left") == self.k
        self.thr = np.full(self.nq, -np.inf, np.float32)
        self.thr[full] = self.s[ends[full] - 1]

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        self.merge()
        if len(self.q) != self.nq * self.k:
            raise AssertionError("fewer candidates than k for some query")
        return self.s.reshape(self.nq, self.k), self.r.reshape(self.nq, self.k)


def code_indices(codes: np.ndarray, K: int) -> torch.Tensor:
    """Codes as rows of the stacked (M*K, nq) table: code_m + m*K, int32."""
    M = codes.shape[1]
    return torch.from_numpy(codes.astype(np.int32)).add_(torch.arange(M, dtype=torch.int32) * K)


def _survivors(S: torch.Tensor, nc: int, thr: np.ndarray):
    """(row, query, score) of the entries of S (B, >= nc) above the per-query threshold."""
    if S.device.type == "cpu":  # numpy's compare + flatnonzero are ~4x faster than torch's here
        Sn = S.numpy()[:, :nc]
        flat = np.flatnonzero(Sn > thr)
        r, q = np.divmod(flat, nc)
        return r, q, Sn[r, q]
    S = S[:, :nc]
    r, q = (S > torch.from_numpy(thr).to(S.device)).nonzero(as_tuple=True)
    return r.cpu().numpy(), q.cpu().numpy(), S[r, q].cpu().numpy()


def torch_topk(tables: np.ndarray, codes: np.ndarray, k: int, device: str | None = None,
               block: int | None = None, query_chunk: int = QUERY_CHUNK) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k with the embedding_bag gather-sum kernel (CPU or CUDA).

    Blocks of codes grow from ~2k rows to ``block`` rows, so the per-query threshold (the k-th
    best so far) is set early and few entries of the later, larger blocks leave the kernel.
    """
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    nq, M, K = tables.shape
    N = len(codes)
    k = min(k, N)
    T = torch.from_numpy(tables if tables.flags.writeable else tables.copy()).to(dev)
    chunks = []  # (first query, query count, stacked transposed tables W (M*K, >= 2), running top-k)
    for c0 in range(0, nq, query_chunk):
        tc = T[c0:c0 + query_chunk]
        W = tc.permute(1, 2, 0).reshape(M * K, len(tc))
        if len(tc) == 1:
            W = W.repeat(1, 2)  # a one-column embedding_bag takes a slow path on the CPU
        chunks.append((c0, len(tc), W.contiguous(), RunningTopK(len(tc), k)))
    B = block or max(1024, min(65536, (1 << 20) // min(nq + (nq == 1), query_chunk)))
    b, b0 = min(B, max(1024, 2 * k)), 0
    while b0 < N:
        idx = code_indices(codes[b0:b0 + b], K).to(dev)  # per block: small, reused allocations
        for c0, nc, W, acc in chunks:
            S = F.embedding_bag(idx, W, mode="sum")
            r, q, s = _survivors(S, nc, acc.thr)
            if len(r) > 2 * k * nc + 1024:  # cut to this block's own top-k per query (ties kept)
                kth = torch.topk(S[:, :nc], min(k, len(S)), dim=0).values[-1].cpu().numpy()
                keep = s >= kth[q]
                r, q, s = r[keep], q[keep], s[keep]
            if len(r):
                acc.add(q, s, r + b0)
        b0 += b
        b = min(B, 2 * b)
    out_s, out_r = np.empty((nq, k), np.float32), np.empty((nq, k), np.int64)
    for c0, nc, _, acc in chunks:
        out_s[c0:c0 + nc], out_r[c0:c0 + nc] = acc.result()
    return out_s, out_r


# --------------------------------------------------------------------------- faiss

def _is_pow2(K: int) -> bool:
    return K >= 2 and K & (K - 1) == 0


@functools.lru_cache(maxsize=8)
def square_codebooks(M: int, K: int) -> np.ndarray:
    """Orthonormal DCT codebooks with d = K, (M, K, K) float64 (any orthonormal set would do)."""
    from model.codebooks import orthonormal_codebooks

    return orthonormal_codebooks(M * K, M, K, dtype=torch.float64).numpy()


@functools.lru_cache(maxsize=8)
def _faiss_centroids(M: int, K: int) -> np.ndarray:
    """The codebooks in faiss's layout: (M, K codewords, d) float32, flattened."""
    return np.ascontiguousarray(square_codebooks(M, K).transpose(0, 2, 1), dtype=np.float32).ravel()


def faiss_index(codes: np.ndarray, K: int, fastscan: bool = False):
    """IndexPQ (inner product) holding ``codes`` with square orthonormal codebooks; its
    IndexPQFastScan conversion when ``fastscan`` (K = 16)."""
    import faiss

    M = codes.shape[1]
    nbits = int(math.log2(K))
    index = faiss.IndexPQ(M * K, M, nbits, faiss.METRIC_INNER_PRODUCT)
    faiss.copy_array_to_vector(_faiss_centroids(M, K), index.pq.centroids)
    index.is_trained = True
    packed = np.ascontiguousarray(codes, dtype=np.uint8) if nbits == 8 else faiss.pack_bitstrings(
        np.ascontiguousarray(codes, dtype=np.int32), nbits)
    index.add_sa_codes(packed)
    if fastscan:
        return faiss.IndexPQFastScan(index)
    return index


def faiss_queries(tables: np.ndarray) -> np.ndarray:
    """q_m = C_m P[m]: faiss's lookup table <q_m, c_mk> is then P[m, k] (up to rounding)."""
    nq, M, K = tables.shape
    C = square_codebooks(M, K)
    return np.einsum("mdk,qmk->qmd", C, tables.astype(np.float64)).reshape(nq, M * K).astype(np.float32)


def error_bound(tables: np.ndarray, fastscan: bool) -> np.ndarray:
    """Per query, a bound on |faiss's score - canonical score| (see the module docstring)."""
    nq, M, K = tables.shape
    t = tables.astype(np.float64)
    amax = np.abs(t).max(axis=2).sum(axis=1)  # sum_m max_k |P[m, k]|
    norms = np.sqrt((t ** 2).sum(axis=2)).sum(axis=1)  # sum_m ||P[m]||
    # table entries: a K-term float32 inner product each; sums: M float32 additions (both kernels)
    eps = 4.0 * _U * ((K + 2) * norms + 4 * M * amax) + 1e-30
    if fastscan:
        span = (t.max(axis=2) - t.min(axis=2)).max(axis=1)
        eps += M * span / 255.0  # 8-bit table: half a step per subspace, doubled for safety
    return eps


def faiss_topk(tables: np.ndarray, codes: np.ndarray, k: int, fastscan: bool = False,
               depth: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Candidates from IndexPQ / IndexPQFastScan, exact re-rank, certified (else deeper / exact)."""
    nq, M, K = tables.shape
    N = len(codes)
    k = min(k, N)
    out_s, out_r = np.empty((nq, k), np.float32), np.empty((nq, k), np.int64)
    index = faiss_index(codes, K, fastscan)
    xq = faiss_queries(tables)
    eps = error_bound(tables, fastscan)
    todo = np.arange(nq)
    # IndexPQ's scores are within float rounding of the exact ones: a few extra candidates
    # suffice unless there are ties; fast-scan's 8-bit table needs a deeper list
    kp = depth or (max(4 * k, MIN_RERANK_DEPTH) if fastscan else k + max(16, k // 4))
    while len(todo):
        if kp >= N // 2:
            s, r = torch_topk(tables[todo], codes, k, device="cpu")
            out_s[todo], out_r[todo] = s, r
            break
        approx, rows = index.search(xq[todo], kp)
        rows = rows.astype(np.int64)
        exact = exact_scores(tables[todo], codes, rows)
        order = np.lexsort((rows, -exact), axis=-1)[:, :k]
        s, r = np.take_along_axis(exact, order, 1), np.take_along_axis(rows, order, 1)
        ok = s[:, -1] > approx.min(axis=1) + eps[todo]
        out_s[todo[ok]], out_r[todo[ok]] = s[ok], r[ok]
        todo = todo[~ok]
        kp *= 4
    return out_s, out_r
