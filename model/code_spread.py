"""Code spread: how evenly a set of compact codes covers the code space ("no sink codes").

A model whose assignment head collapses sends most faces to one code (a "sink"): every one of
them then gets the same score for every query, so codes-only retrieval cannot rank them
(seen on unseen grey faces: 475 of 476 shared one code, P@5 0.000). The LUT scores and mAP
show the damage only indirectly; these numbers show it directly, for any (N, M) code array:

- ``largest_bucket``: share of the rows holding the most frequent full code (0..1), with
  ``largest_bucket_rows`` and ``largest_code`` (that code);
- ``distinct_codes``: number of different full codes;
- ``codewords_used``: per subspace, how many of the K codewords occur; ``codewords_used_mean``;
- ``code_entropy_bits``: entropy (bits) of the empirical distribution of full codes: log2 N
  when every row is distinct, 0 when all share one code, never above M log2 K;
- ``subspace_entropy_bits_mean``: mean over subspaces of the entropy of the codeword
  distribution (at most log2 K): low values name a subspace that uses few codewords.

``SpreadCounter`` accumulates chunks (a gallery's shards) with memory bounded by the number
of distinct codes, so a gallery is measured without holding all its codes. Pure numpy: this
module imports nothing else of the project.
"""
from __future__ import annotations

import numpy as np

# Sink warning thresholds (see ``sink_warning``): the target is that no code holds more
# than 2 % of a gallery of >= 300 faces; on smaller sets 2 % is a handful of faces and chance
# collisions pass it, so they are flagged only above 10 %.
SINK_SHARE = 0.02
SINK_SHARE_SMALL = 0.10
SINK_MIN_ROWS = 300
MAX_K = 1 << 16  # codes are stored as uint8 or uint16


def _entropy_bits(counts: np.ndarray) -> float:
    counts = counts[counts > 0].astype(np.float64)
    if not len(counts):
        return 0.0
    p = counts / counts.sum()
    return float(max(0.0, -(p * np.log2(p)).sum()))


class SpreadCounter:
    """Counts of full codes and of codewords per subspace, added chunk by chunk.

    A full code is packed into one int64 key (``ceil(log2 K)`` bits per subspace) when it
    fits, else kept as the raw bytes of its row; chunks' (key, count) pairs are merged when
    they outgrow the distinct keys already counted, so adding a gallery shard by shard costs
    O(N log N) overall and memory stays bounded by the distinct codes plus one chunk.
    """

    def __init__(self, M: int, K: int):
        if M < 1 or not 1 <= K <= MAX_K:
            raise ValueError(f"code spread needs M >= 1 and 1 <= K <= {MAX_K} (uint8/uint16 codes), got M={M}, K={K}")
        self.M, self.K = int(M), int(K)
        self.rows = 0
        bits = max(1, int(np.ceil(np.log2(self.K))))
        self._shifts = (np.arange(self.M, dtype=np.int64) * bits) if bits * self.M <= 63 else None
        self._mask = (1 << bits) - 1
        self._keys, self._counts = self._key_of(np.zeros((0, self.M), np.int64)), np.zeros(0, np.int64)
        self._pending: list[tuple[np.ndarray, np.ndarray]] = []
        self._per_subspace = np.zeros((self.M, self.K), np.int64)

    def _key_of(self, codes: np.ndarray) -> np.ndarray:
        if self._shifts is not None:
            return (codes << self._shifts).sum(axis=1)
        return np.ascontiguousarray(codes).view(np.dtype((np.void, 8 * self.M))).reshape(-1)

    def _code_of(self, key) -> list[int]:
        if self._shifts is not None:
            return ((int(key) >> self._shifts) & self._mask).tolist()
        return np.frombuffer(key.tobytes(), np.int64).tolist()

    def add(self, codes) -> "SpreadCounter":
        """Add an (n, M) array of integer codes in [0, K)."""
        codes = np.asarray(codes)
        if codes.ndim != 2 or codes.shape[1] != self.M:
            raise ValueError(f"codes must be an (N, {self.M}) array, got shape {codes.shape}")
        if len(codes) and not np.issubdtype(codes.dtype, np.integer):
            raise ValueError(f"codes must be integers, got dtype {codes.dtype}")
        if not len(codes):
            return self
        codes = codes.astype(np.int64)
        lo, hi = int(codes.min()), int(codes.max())
        if lo < 0 or hi >= self.K:
            raise ValueError(f"codes must lie in [0, {self.K}), got values in [{lo}, {hi}]")
        for m in range(self.M):
            self._per_subspace[m] += np.bincount(codes[:, m], minlength=self.K)
        self._pending.append(np.unique(self._key_of(codes), return_counts=True))
        self.rows += len(codes)
        if sum(len(k) for k, _ in self._pending) > max(len(self._keys), 1 << 16):
            self._merge()
        return self

    def _merge(self) -> None:
        if not self._pending:
            return
        keys = np.concatenate([self._keys] + [k for k, _ in self._pending])
        counts = np.concatenate([self._counts] + [c for _, c in self._pending])
        self._keys, inverse = np.unique(keys, return_inverse=True)
        self._counts = np.bincount(inverse.reshape(-1), weights=counts, minlength=len(self._keys)).astype(np.int64)
        self._pending = []

    def result(self) -> dict:
        """The spread metrics (module docstring) of everything added; zeros for no rows."""
        self._merge()
        n = self.rows
        used = [int((self._per_subspace[m] > 0).sum()) for m in range(self.M)]
        top = int(np.argmax(self._counts)) if n else -1  # keys are sorted: ties go to the smallest key
        return {
            "rows": n, "M": self.M, "K": self.K,
            "largest_bucket": float(self._counts[top] / n) if n else 0.0,
            "largest_bucket_rows": int(self._counts[top]) if n else 0,
            "largest_code": self._code_of(self._keys[top]) if n else [],
            "distinct_codes": int(len(self._keys)),
            "codewords_used": used,
            "codewords_used_mean": float(np.mean(used)),
            "code_entropy_bits": _entropy_bits(self._counts),
            "subspace_entropy_bits_mean": float(np.mean([_entropy_bits(c) for c in self._per_subspace])),
        }


def code_spread(codes, K: int) -> dict:
    """Spread metrics of an (N, M) integer code array with K codewords per subspace."""
    codes = np.asarray(codes)
    if codes.ndim != 2:
        raise ValueError(f"codes must be an (N, M) array, got shape {codes.shape}")
    return SpreadCounter(codes.shape[1], K).add(codes).result()


def sink_threshold(rows: int) -> float:
    """Largest-bucket share above which a set of ``rows`` codes is flagged as collapsed."""
    return SINK_SHARE if rows >= SINK_MIN_ROWS else SINK_SHARE_SMALL


def mixed_bucket(codes, labels) -> dict:
    """The code that holds the most faces of other people than its commonest one.

    Many photos of one person sharing a code is what a good model does (a seen gallery's most
    photographed person can fill one code); many people sharing one is a sink. With labels,
    ``mixed_bucket`` (share of all rows) counts, per code, the faces not of its commonest
    identity, and ``mixed_code`` names the worst code.
    """
    codes, labels = np.asarray(codes), np.asarray(labels)
    if not len(codes):
        return {"mixed_bucket": 0.0, "mixed_bucket_rows": 0, "mixed_code": []}
    keys, bucket = np.unique(codes, axis=0, return_inverse=True)
    _, person = np.unique(labels, return_inverse=True)
    pairs, counts = np.unique(np.stack([bucket.ravel(), person.ravel()], 1), axis=0, return_counts=True)
    commonest = np.zeros(len(keys), np.int64)
    np.maximum.at(commonest, pairs[:, 0], counts)
    others = np.bincount(bucket.ravel(), minlength=len(keys)) - commonest
    worst = int(others.argmax())
    return {"mixed_bucket": float(others[worst]) / len(codes), "mixed_bucket_rows": int(others[worst]),
            "mixed_code": [int(c) for c in keys[worst]]}


def sink_warning(spread: dict, what: str = "database faces") -> str | None:
    """A warning naming the bucket share when one code holds more than ``sink_threshold`` of the
    rows (and at least two rows share it), else None. When ``spread`` holds ``mixed_bucket``
    (identities known), only faces of different people in one code count."""
    n = spread["rows"]
    mixed = "mixed_bucket" in spread
    share, rows, code = ((spread["mixed_bucket"], spread["mixed_bucket_rows"], spread["mixed_code"]) if mixed else
                         (spread["largest_bucket"], spread["largest_bucket_rows"], spread["largest_code"]))
    if n < 2 or rows < 2 or share <= sink_threshold(n):
        return None
    code = ", ".join(str(c) for c in code)
    people = " of other people than its commonest one" if mixed else ""
    return (f"warning: {100 * share:.1f}% of the {n} {what} ({rows}{people}) share one code "
            f"({code}); limit {100 * sink_threshold(n):g}% for {'>=' if n >= SINK_MIN_ROWS else '<'} "
            f"{SINK_MIN_ROWS} faces. Faces with the same code score the same for every query, so codes-only "
            f"retrieval cannot rank them and will be poor: the model's assignment head collapses on these faces "
            f"(sink code). Re-rank with stored features (--store-features/--rerank) or a refine code "
            f"(--refine-bytes/--refine), or train with more varied data; see README 'Code spread'.")
