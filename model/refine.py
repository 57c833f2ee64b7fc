"""Refine codes: a compact second code per face that re-ranks the PQ candidates.

Why: OPQN's few-byte codes lose much of the model's quality on people it never saw,
and the exact fix (float16 features, ``--store-features``) costs 2 x D bytes a face. A refine
code spends a stated budget of ``B`` more bytes a face instead, as faiss's refine indexes do:

- Transform: the face's l2-normalised float feature x (the vector
  ``model.features.stored_feature`` stores) is centred and projected onto the top
  ``dim`` principal axes of the training sample, ``y = A (x - mean)``, ``A`` (dim, D) with
  orthonormal rows. The axes are dealt to the B sub-quantizers so that each gets a similar
  share of the variance (``eigenvalue_allocation``, the greedy form of OPQ's eigenvalue
  allocation). ``dim`` is a multiple of B, by default 4 B (``auto_dim``). Measured on unseen
  LFW (docs/results.md, B = 60): the refine re-rank kept 0.74 of the float mAP with the axes in
  plain PCA order and 0.999 balanced; with the quantizer trained on half the gallery, 4 axes a
  byte (0.994) beat 1, 2, 8 and 16 (0.967, 0.980, 0.991, 0.977).
- Product quantizer: B sub-quantizers of 256 centroids (8 bits, one byte each) over
  ``dim / B`` dimensions, trained by faiss's k-means (fixed seed). A code is the nearest
  centroid per subspace (squared L2, first on ties), computed in numpy, row by row, so a
  face's code does not depend on the batch it was encoded in.
- Decode: ``x_hat = A^T y_hat + mean``, y_hat the concatenated centroids.
- Score (the re-rank): ``dot(q, x_hat)`` for the l2-normalised query feature q, taken as
  ``dot(A q, y_hat) + dot(q, mean)`` in float64 and rounded to float32 (the same number, d
  instead of D multiply-adds a pair, and independent of how pairs are batched).

With fewer than 256 training faces k-means cannot make 256 centroids; the centroids are then
the training faces' own sub-vectors (repeated to 256), exact for them. Stored without pickle:
one ``.npz`` of float32 arrays (``mean``, ``transform``, ``centroids``) read with
``allow_pickle=False``; the gallery format (``pipelines.formats.gallery``) names it, with its sha256, in the manifest.
"""
from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np

NBITS = 8
CENTROIDS = 1 << NBITS
TRAIN_SEED = 0
SCORING = "inner product of the l2-normalised query feature with the decoded refine vector"
TRANSFORM = "pca-eigenvalue-allocation"
# Gallery codes (``opqn encode --codes gallery``): the same quantizer with one byte per codebook
# of the model (B = M) over a projection of this many dimensions per byte. Measured on unseen
# LFW with 4 bytes (docs/results.md, "Gallery codes"): 16 to 256 dimensions all kept 0.63-0.69x of the
# float mAP; 32 was best or tied on unseen LFW and AT&T.
GALLERY_CODE_DIMS_PER_BYTE = 8
CODE_SOURCES = ("model", "gallery")  # where a gallery's codes come from: the network, or its own quantizer
TRAIN_SAMPLE = 50_000  # faces a gallery's quantizers are trained on (its first ones encoded)
ROWS_PER_CHUNK = 4096  # rows encoded at once: ROWS_PER_CHUNK x 256 x dim/B float32 distances per subspace


def auto_dim(D: int, B: int) -> int:
    """Projected dimension for B sub-quantizers: 4 dimensions each (faiss's usual OPQ{B}_{4B}
    layout), or the largest multiple of B up to D when D is smaller than 4 B."""
    check_bytes(B, D)
    return min(4 * B, D - D % B)


def check_bytes(B: int, D: int) -> None:
    if B < 1:
        raise ValueError(f"refine bytes must be >= 1 (0: no refine code), got {B}")
    if B > D:
        raise ValueError(f"refine bytes {B} exceed the feature size D={D}: at most one byte per dimension")


@dataclass(frozen=True)
class RefineQuantizer:
    mean: np.ndarray  # (D,) float32
    transform: np.ndarray  # (dim, D) float32, orthonormal rows
    centroids: np.ndarray  # (B, 256, dim / B) float32

    def __post_init__(self):
        D, (dim, D2), (B, k, dsub) = len(self.mean), self.transform.shape, self.centroids.shape
        if D2 != D or k != CENTROIDS or B * dsub != dim:
            raise ValueError(f"refine quantizer arrays do not fit: mean {self.mean.shape}, transform "
                             f"{self.transform.shape}, centroids {self.centroids.shape}")

    @property
    def bytes(self) -> int:
        return self.centroids.shape[0]

    @property
    def D(self) -> int:
        return len(self.mean)

    @property
    def dim(self) -> int:
        return self.transform.shape[0]

    def project(self, x: np.ndarray) -> np.ndarray:
        """Normalised features (n, D) -> y = A (x - mean), (n, dim) float32."""
        x = np.asarray(x, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != self.D:
            raise ValueError(f"refine quantizer takes (n, {self.D}) features, got shape {x.shape}")
        return (x - self.mean) @ self.transform.T

    def encode(self, x: np.ndarray) -> np.ndarray:
        """Normalised features (n, D) -> refine codes (n, B) uint8."""
        y = self.project(x)
        B, _, dsub = self.centroids.shape
        codes = np.empty((len(y), B), np.uint8)
        for c0 in range(0, len(y), ROWS_PER_CHUNK):
            part = y[c0:c0 + ROWS_PER_CHUNK].reshape(-1, B, dsub)
            for j in range(B):
                diff = part[:, j, None, :] - self.centroids[j][None]
                codes[c0:c0 + len(part), j] = np.einsum("nkd,nkd->nk", diff, diff).argmin(axis=1)
        return codes

    def reconstruct(self, codes: np.ndarray) -> np.ndarray:
        """Refine codes (n, B) -> y_hat (n, dim) float32, the centroids side by side."""
        codes = self.check_codes(codes)
        B = self.bytes
        return self.centroids[np.arange(B)[None, :], codes.astype(np.int64)].reshape(len(codes), -1)

    def decode(self, codes: np.ndarray) -> np.ndarray:
        """Refine codes (n, B) -> the approximate normalised features x_hat (n, D) float64."""
        return self.reconstruct(codes).astype(np.float64) @ self.transform.astype(np.float64) + self.mean

    def query_side(self, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(A q, dot(q, mean)) of the l2-normalised query features, float64: what ``pair_scores`` takes."""
        q = np.asarray(queries, dtype=np.float64)
        q = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
        return q @ self.transform.T.astype(np.float64), q @ self.mean.astype(np.float64)

    def pair_scores(self, projected: np.ndarray, offsets: np.ndarray, codes: np.ndarray) -> np.ndarray:
        """Scores of (query, code) pairs, row by row: ``projected``/``offsets`` from ``query_side``
        for each pair's query, ``codes`` (n, B) its candidate's refine code; float32."""
        y = self.reconstruct(codes).astype(np.float64)
        return (np.einsum("ij,ij->i", projected, y) + offsets).astype(np.float32)

    def tables(self, queries: np.ndarray) -> np.ndarray:
        """Look-up tables (nq, B, 256) float32 of the queries (l2-normalised here):
        ``T[q, j, k] = dot((A q)_j, centroid k of sub-quantizer j) + dot(q, mean) / B``, so that
        ``sum_j T[q, j, code_j]`` is ``pair_scores``' refine score up to float32 rounding. With
        these tables a code shard is scanned by the query stage's kernels like the model's
        own codes (gallery codes, ``opqn encode --codes gallery``)."""
        projected, offsets = self.query_side(queries)
        B, _, dsub = self.centroids.shape
        t = np.einsum("qjd,jkd->qjk", projected.reshape(len(projected), B, dsub), self.centroids.astype(np.float64))
        return (t + offsets[:, None, None] / B).astype(np.float32)

    def check_codes(self, codes: np.ndarray) -> np.ndarray:
        codes = np.asarray(codes)
        if codes.ndim != 2 or codes.shape[1] != self.bytes or codes.dtype != np.uint8:
            raise ValueError(f"refine codes must be (n, {self.bytes}) uint8, got {codes.dtype} {codes.shape}")
        return codes

    def to_bytes(self) -> bytes:
        buf = io.BytesIO()
        np.savez(buf, mean=self.mean, transform=self.transform, centroids=self.centroids)
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes, name: str = "refine quantizer") -> "RefineQuantizer":
        """Read ``to_bytes``' output (no pickle: ``allow_pickle=False``); errors name ``name``."""
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as z:
                arrays = {k: z[k] for k in ("mean", "transform", "centroids")}
        except Exception as exc:  # zip, npy header or missing-key errors of a damaged file
            raise ValueError(f"{name} is not a readable refine quantizer (.npz of mean, transform, "
                             f"centroids): {exc}") from exc
        bad = {k: str(v.dtype) for k, v in arrays.items() if v.dtype != np.float32}
        if bad:
            raise ValueError(f"{name}: arrays must be float32, got {bad}")
        return cls(**arrays)


def eigenvalue_allocation(eigenvalues: np.ndarray, B: int) -> np.ndarray:
    """Order of the principal axes that puts dim/B of them in each of the B subspaces with about
    equal variance per subspace: each axis, largest variance first, goes to the non-full
    subspace whose variance so far is smallest (faiss's balanced bins, the greedy form of OPQ's
    eigenvalue allocation; a product of variances below 1 would shrink as axes are added and
    pile the largest axes into one subspace)."""
    per = len(eigenvalues) // B
    total = np.zeros(B)
    members: list[list[int]] = [[] for _ in range(B)]
    for i in np.argsort(-eigenvalues, kind="stable"):
        j = min((s for s in range(B) if len(members[s]) < per), key=lambda s: (total[s], s))
        members[j].append(int(i))
        total[j] += max(float(eigenvalues[i]), 0.0)
    return np.array([i for m in members for i in m])


def gallery_code_dim(M: int, D: int) -> int:
    """Projected dimension of a gallery's own codes (M bytes): GALLERY_CODE_DIMS_PER_BYTE a byte, at most D."""
    check_bytes(M, D)
    return min(GALLERY_CODE_DIMS_PER_BYTE * M, D - D % M)


def train_gallery_codes(features: np.ndarray, M: int, K: int) -> RefineQuantizer:
    """The quantizer of a gallery's own codes (``--codes gallery``), in place of a model's M
    codebooks of K codewords: M bytes, so only K = 256 fits the gallery's code shards."""
    if K != CENTROIDS:
        raise ValueError(f"gallery codes make one byte per codebook ({CENTROIDS} centroids), but the model has "
                         f"K={K}: use --codes model, or a model with {CENTROIDS} codewords per codebook")
    x = np.asarray(features)
    return train_quantizer(x, M, gallery_code_dim(M, x.shape[1]))


def train_quantizer(features: np.ndarray, B: int, dim: int = 0, seed: int = TRAIN_SEED) -> RefineQuantizer:
    """Train a refine quantizer of ``B`` bytes on l2-normalised features (n, D); deterministic."""
    x = np.asarray(features, dtype=np.float32)  # float32 throughout: 50k x 1024 is 200 MB a copy
    if x.ndim != 2 or not len(x):
        raise ValueError(f"refine quantizer training needs a non-empty (n, D) feature array, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError("refine quantizer training: the features are not all finite")
    n, D = x.shape
    dim = dim or auto_dim(D, B)
    check_bytes(B, D)
    if dim % B or not B <= dim <= D:
        raise ValueError(f"refine dim {dim} must be a multiple of the {B} refine bytes and at most D={D}")
    mean = x.mean(axis=0, dtype=np.float64).astype(np.float32)
    centred = x - mean
    eigenvalues, vectors = np.linalg.eigh((centred.T @ centred).astype(np.float64) / n)  # ascending
    top = np.argsort(-eigenvalues, kind="stable")[:dim]
    order = top[eigenvalue_allocation(eigenvalues[top], B)]
    transform = np.ascontiguousarray(vectors[:, order].T, dtype=np.float32)
    y = np.ascontiguousarray(centred @ transform.T)
    del centred
    dsub = dim // B
    if n < CENTROIDS:  # k-means needs 256 points: the training faces' own sub-vectors, repeated
        centroids = y[np.arange(CENTROIDS) % n].reshape(CENTROIDS, B, dsub).transpose(1, 0, 2)
    else:
        import faiss

        pq = faiss.ProductQuantizer(dim, B, NBITS)
        pq.cp.seed = seed
        pq.cp.min_points_per_centroid = 1  # small galleries: no warning per subspace; n is reported instead
        pq.train(y)
        centroids = faiss.vector_to_array(pq.centroids).reshape(B, CENTROIDS, dsub)
    return RefineQuantizer(mean=mean, transform=transform,
                           centroids=np.ascontiguousarray(centroids, dtype=np.float32))
