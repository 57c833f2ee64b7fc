"""Compact refine codes: `opqn encode --refine-bytes B` (a B-byte product quantizer of the
normalised float feature, trained by the gallery's first encode and stored in the gallery) and
the query stage's `--refine R` (PQ top-R re-scored by the refine code).

Real face shards from LFW, a tiny trained OPQN, real Ray; results are compared with a numpy
brute force over the stored refine codes, decoded to full feature vectors."""
import shutil
import sys
from dataclasses import asdict, replace

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from pipelines.formats.checkpoint import load_checkpoint, model_from_checkpoint
from pipelines.encode.gallery_info import info
from pipelines.encode.run import EncodeConfig, encode_gallery
from pipelines.formats.faces import decode_batch
from pipelines.formats.gallery import load_quantizer, paired_path, require_gallery
from model.features import embed, normalized_feature
from pipelines.formats.checkpoint import stored_size
from pipelines.query.run import QueryConfig, query_batch
from pipelines.config_flags import config_from_args
from model.refine import CENTROIDS, RefineQuantizer, auto_dim, train_quantizer
from storage import manifest as manifests
from storage.manifest import read_manifest
from storage.tables import read_table
from test_query import assert_same
from test_rerank import (ENC, LOCAL, assert_same_for_any_grouping, dataset, delete_and_compact,  # noqa: F401
                         encode_query_parser, model_url, paired_arrays)
from test_rerank import brute_force as rerank_brute_force

pytestmark = pytest.mark.usefixtures("ray_local")

B = 8  # refine bytes: D = 64 is projected to 32 dimensions (4 per sub-quantizer), a lossy code
REFINE = replace(ENC, refine_bytes=B)


@pytest.fixture(scope="module")
def gallery_with_refine(dataset, model_url, tmp_path_factory):
    url = str(tmp_path_factory.mktemp("gr") / "gallery")
    summary = encode_gallery(model_url, str(dataset), url, REFINE, out=sys.stderr)
    assert summary["faces"] == 56 and summary["refine_bytes"] == B
    return url


def refine_arrays(gallery_url):
    """(face ids, codes (N, M), refine codes (N, B)) in gallery order (shard, row)."""
    return paired_arrays(gallery_url, "refine")


def database_features(dataset, model_url, face_ids):
    """The normalised float features of the given database faces, computed afresh."""
    state = load_checkpoint(model_url)
    faces = pq.read_table(dataset / "faces").to_pydict()
    row = {f: i for i, f in enumerate(faces["face_id"])}
    images = torch.from_numpy(decode_batch([faces["image"][row[f]] for f in face_ids], stored_size(state)))
    return normalized_feature(embed(model_from_checkpoint(state), images))


def assert_refine_codes_of(quantizer, features, refine):
    """The stored refine codes are the quantizer's codes of the faces' features. Compared decoded:
    the features computed here differ from the encoder's in the last float bits (other batches),
    which may flip a code between centroids that are equally near (the ones a small training set
    leaves on zero-variance axes), never the vector it stands for."""
    np.testing.assert_allclose(quantizer.decode(quantizer.encode(features)), quantizer.decode(refine), atol=1e-5)
    assert (quantizer.encode(features) == refine).mean() > 0.75


def brute_force(model_url, queries, gallery_url, k, R, deleted=()):
    """PQ top-R re-scored in numpy by dot(normalised query, decoded refine vector), then the top-k
    (``test_rerank.brute_force`` over the refine shards)."""
    return rerank_brute_force(model_url, queries, gallery_url, k, R, deleted, kind="refine")


def test_quantizer_is_deterministic_round_trips_and_scores_what_it_decodes():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((600, 48)) @ rng.standard_normal((48, 48))
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    q = train_quantizer(x, 12)  # faiss k-means: 600 >= 256 training points
    assert (q.bytes, q.D, q.dim, q.centroids.shape) == (12, 48, auto_dim(48, 12), (12, CENTROIDS, 4))
    np.testing.assert_allclose(q.transform @ q.transform.T, np.eye(q.dim), atol=1e-5)  # orthonormal rows
    again = train_quantizer(x, 12)
    assert again.to_bytes() == q.to_bytes()  # fixed seed: the same quantizer
    codes = q.encode(x)
    assert codes.dtype == np.uint8 and codes.shape == (600, 12)
    loaded = RefineQuantizer.from_bytes(q.to_bytes())
    assert np.array_equal(loaded.encode(x), codes)
    assert np.array_equal(np.concatenate([q.encode(x[i:i + 7]) for i in range(0, 600, 7)]), codes)  # batch-free
    decoded = q.decode(codes)
    assert np.linalg.norm(decoded - x) / np.linalg.norm(x) < 0.6  # a lossy but real approximation
    projected, offsets = q.query_side(x[:5] * 3.0)  # any scale: queries are normalised
    pairs = q.pair_scores(projected[[0, 1, 4]], offsets[[0, 1, 4]], codes[[10, 11, 12]])
    np.testing.assert_allclose(pairs, np.einsum("ij,ij->i", x[[0, 1, 4]].astype(np.float64), decoded[[10, 11, 12]]),
                               atol=1e-6)
    # fewer faces than centroids: the training faces' own sub-vectors, so their codes are exact
    small = train_quantizer(x[:40], 12, dim=48)
    np.testing.assert_allclose(small.decode(small.encode(x[:40])), x[:40], atol=1e-5)


def test_quantizer_bad_input_is_named():
    x = np.ones((10, 16), np.float32) / 4
    with pytest.raises(ValueError, match="refine bytes 32 exceed the feature size D=16"):
        train_quantizer(x, 32)
    with pytest.raises(ValueError, match="refine dim 12 must be a multiple of the 8 refine bytes"):
        train_quantizer(x, 8, dim=12)
    with pytest.raises(ValueError, match="refine bytes must be >= 1"):
        train_quantizer(x, 0)
    with pytest.raises(ValueError, match="not a readable refine quantizer"):
        RefineQuantizer.from_bytes(b"not an npz", "g/quantizer/x.npz")
    q = train_quantizer(x, 4)
    with pytest.raises(ValueError, match=r"refine codes must be \(n, 4\) uint8"):
        q.decode(np.zeros((2, 5), np.uint8))


def test_encode_writes_paired_refine_shards_and_the_gallery_quantizer(dataset, model_url, gallery_with_refine):
    g = require_gallery(gallery_with_refine)
    assert g.has_refine and not g.has_features and g.refine_bytes == B
    assert [f.path for f in g.refine] == [paired_path(s.path, "refine") for s in g.shards] and len(g.shards) >= 6
    meta = read_manifest(gallery_with_refine).metadata["refine"]
    assert (meta["bytes"], meta["nbits"], meta["dim"], meta["trained_on"]) == (B, 8, 4 * B, 56)
    listed = {f.path: f for f in read_manifest(gallery_with_refine).files}
    assert listed[meta["quantizer"]["path"]].sha256 == meta["quantizer"]["sha256"]  # listed: verify() covers it
    manifests.verify(gallery_with_refine)
    assert manifests.orphans(gallery_with_refine) == []
    assert str(pq.read_schema(g.refine_urls()[0]).field("refine").type) == "fixed_size_list<element: uint8>[8]"
    # the stored refine codes are the reloaded quantizer's codes of each face's normalised feature
    ids, _, refine = refine_arrays(gallery_with_refine)
    assert_refine_codes_of(load_quantizer(g), database_features(dataset, model_url, ids), refine)
    shown = info(gallery_with_refine)
    assert shown["refine"].startswith(f"{B} bytes/face: PQ {B} x 8 bit over a {4 * B}-dim projection")
    assert f"codes + refine = {g.M + B} bytes/face" in shown["refine"]
    assert shown["refine_shard_bytes"] == sum(f.size for f in g.refine) > 0


def test_refine_rerank_equals_the_brute_force_over_decoded_codes(dataset, model_url, gallery_with_refine, tmp_path):
    expected = brute_force(model_url, str(dataset), gallery_with_refine, k=5, R=12)
    summary = assert_same_for_any_grouping(model_url, dataset, gallery_with_refine, tmp_path, expected, refine=12)
    assert summary["refine"] == 12 and summary["rerank"] == 0
    # the re-rank changes the PQ order
    pq_only = tmp_path / "pq.parquet"
    query_batch(model_url, gallery_with_refine, str(dataset), str(pq_only), QueryConfig(top_k=5, **LOCAL))
    assert read_table(str(pq_only)).column("face_id").to_pylist() != [r["face_id"] for r in expected]


def test_refine_setting_is_fixed_per_gallery(dataset, model_url, gallery_with_refine, tmp_path):
    before = read_manifest(gallery_with_refine)
    for cfg, match in [(ENC, "stores 8-byte refine codes.*pass --refine-bytes 8"),
                       (replace(ENC, refine_bytes=4), "stores 8-byte refine codes.*--refine-bytes 4")]:
        with pytest.raises(ValueError, match=match):
            encode_gallery(model_url, str(dataset), gallery_with_refine, cfg)
    assert read_manifest(gallery_with_refine) == before
    plain = str(tmp_path / "plain")
    encode_gallery(model_url, str(dataset), plain, replace(ENC, max_sources=1), out=sys.stderr)
    with pytest.raises(ValueError, match=f"gallery {plain} was encoded without refine codes"):
        encode_gallery(model_url, str(dataset), plain, REFINE)
    out = tmp_path / "r.parquet"
    with pytest.raises(ValueError, match=f"gallery {plain} has no refine codes.*--refine-bytes B"):
        query_batch(model_url, plain, str(dataset), str(out), QueryConfig(top_k=5, refine=10, **LOCAL))
    with pytest.raises(ValueError, match="has no stored float features"):
        query_batch(model_url, gallery_with_refine, str(dataset), str(out), QueryConfig(top_k=5, rerank=10, **LOCAL))
    assert not out.exists()
    with pytest.raises(ValueError, match="rerank=10 and refine=10 are alternatives"):
        QueryConfig(top_k=5, rerank=10, refine=10)
    with pytest.raises(ValueError, match="refine R=3 must be >= top_k=5"):
        QueryConfig(top_k=5, refine=3)


def test_incremental_encodes_reuse_the_first_quantizer(dataset, model_url, gallery_with_refine, tmp_path):
    url = str(tmp_path / "g")
    first = encode_gallery(model_url, str(dataset), url, replace(REFINE, max_sources=1), out=sys.stderr)
    meta = require_gallery(url).refine_meta
    assert meta["trained_on"] == first["faces"] < 56  # trained on the first run's faces only
    encode_gallery(model_url, str(dataset), url, REFINE, out=sys.stderr)
    g = require_gallery(url)
    assert g.refine_meta == meta and g.rows == 56
    assert sum(f.path.startswith("quantizer/") for f in read_manifest(url).files) == 1
    ids, _, refine = refine_arrays(url)
    assert_refine_codes_of(load_quantizer(g), database_features(dataset, model_url, ids), refine)
    out = tmp_path / "r.parquet"
    query_batch(model_url, url, str(dataset), str(out), QueryConfig(top_k=4, refine=9, **LOCAL))
    assert_same(out, brute_force(model_url, str(dataset), url, k=4, R=9))


def test_a_damaged_quantizer_is_refused(model_url, dataset, gallery_with_refine, tmp_path):
    url = str(tmp_path / "g")
    shutil.copytree(gallery_with_refine, url)
    path = tmp_path / "g" / require_gallery(url).refine_meta["quantizer"]["path"]
    path.write_bytes(path.read_bytes()[:-1] + b"x")
    with pytest.raises(ValueError, match="does not match the gallery manifest.*damaged"):
        query_batch(model_url, url, str(dataset), str(tmp_path / "r.parquet"), QueryConfig(top_k=5, refine=10, **LOCAL))


def test_delete_and_compact_keep_refine_shards_paired(dataset, model_url, gallery_with_refine, tmp_path):
    gallery = delete_and_compact(model_url, dataset, gallery_with_refine, tmp_path, "refine", brute_force, refine=15)
    g = require_gallery(gallery)
    assert sum(f.path.startswith("quantizer/") for f in read_manifest(gallery).files) == 1  # the quantizer stays
    assert g.refine_meta == require_gallery(gallery_with_refine).refine_meta
    assert info(gallery)["refine_shard_bytes"] == sum(f.size for f in g.refine)


def test_cli_switches():
    parser = encode_query_parser()
    e = config_from_args(EncodeConfig, parser.parse_args(["encode", "m", "d", "g", "--refine-bytes", "60",
                                                          "--refine-dim", "120", "--refine-sample", "1000"]))
    assert (e.refine_bytes, e.refine_dim, e.refine_sample) == (60, 120, 1000)
    assert asdict(EncodeConfig())["refine_bytes"] == 0
    q = config_from_args(QueryConfig, parser.parse_args(["query", "m", "g", "q", "r", "--top-k", "10", "--refine", "500"]))
    assert (q.top_k, q.refine, q.rerank, q.depth) == (10, 500, 0, 500)
