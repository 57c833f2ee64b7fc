"""Gallery codes: `opqn encode --codes gallery` writes, in place of the model's own codes, the
M-byte codes of a product quantizer trained on the gallery's first faces; queries score them
with that quantizer's tables; `opqn evaluate --codes gallery` measures the same codes.

Real face shards from LFW, a tiny trained OPQN with K = 256, real Ray; results are compared
with a numpy brute force over the stored codes and the reloaded quantizer."""
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch

from model.refine import gallery_code_dim, train_quantizer
from model.scoring import lut_scores
from pipelines.encode.gallery_info import info
from pipelines.encode.run import encode_gallery
from pipelines.evaluate.evaluation import evaluate_model
from pipelines.evaluate.protocols import load_split
from pipelines.formats.checkpoint import load_checkpoint, model_from_checkpoint, stored_size
from pipelines.formats.gallery import load_quantizer, read_codes, require_gallery
from pipelines.query.run import QueryConfig, query_batch
from storage import manifest as manifests
from storage.manifest import read_manifest
from test_query import assert_same
from test_refine import assert_refine_codes_of, database_features
from test_rerank import ENC, LOCAL, dataset, query_side, tiny_model  # noqa: F401

pytestmark = pytest.mark.usefixtures("ray_local")

GALLERY_CODES = replace(ENC, codes="gallery")


@pytest.fixture(scope="module")
def model_url(dataset, tmp_path_factory):
    """M = 2 codebooks of K = 256 codewords, D = 512: gallery codes are 2 bytes over 16 dimensions."""
    return tiny_model(dataset, tmp_path_factory.mktemp("model256"), codewords=256, dim=0)


@pytest.fixture(scope="module")
def gallery(dataset, model_url, tmp_path_factory):
    url = str(tmp_path_factory.mktemp("gq") / "gallery")
    summary = encode_gallery(model_url, str(dataset), url, GALLERY_CODES, out=sys.stderr)
    assert summary["faces"] == 56 and summary["codes"] == "gallery"
    return url


def gallery_codes(gallery_url):
    """(face ids, codes (N, M)) in gallery order (shard, row)."""
    g = require_gallery(gallery_url)
    ids, codes = [], []
    for url in g.shard_urls():
        fid, c = read_codes(url, g.M)
        ids += fid.to_pylist()
        codes.append(c)
    return ids, np.concatenate(codes)


def test_tables_score_what_the_codes_decode_to():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((700, 64)) @ rng.standard_normal((64, 64))
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    q = train_quantizer(x, 4, gallery_code_dim(4, 64))
    assert q.dim == 32 and q.centroids.shape == (4, 256, 8)
    codes = q.encode(x[100:])
    queries = x[:7] * 2.5  # any scale: queries are normalised
    tables = q.tables(queries)
    assert tables.shape == (7, 4, 256) and tables.dtype == np.float32
    via_tables = lut_scores(torch.from_numpy(tables), torch.from_numpy(codes.astype(np.int64))).numpy()
    decoded = q.decode(codes)
    brute = (queries / np.linalg.norm(queries, axis=1, keepdims=True)).astype(np.float64) @ decoded.T
    np.testing.assert_allclose(via_tables, brute, atol=2e-6)


def test_encode_writes_the_gallery_quantizers_codes(dataset, model_url, gallery):
    g = require_gallery(gallery)
    meta = read_manifest(gallery).metadata
    assert g.codes_source == "gallery" and meta["codebook_scheme"] == "gallery-pq"
    assert (meta["codebook"]["bytes"], meta["codebook"]["dim"], meta["codebook"]["trained_on"]) == (2, 16, 56)
    assert meta["codebook"]["quantizer"]["path"].startswith("quantizer/codes-")
    assert "refine" not in meta and not g.has_refine
    manifests.verify(gallery)  # the quantizer file is listed, so verify covers it
    assert manifests.orphans(gallery) == []
    ids, codes = gallery_codes(gallery)
    quantizer = load_quantizer(g, kind="codebook")
    assert_refine_codes_of(quantizer, database_features(dataset, model_url, ids), codes)
    assert info(gallery)["codes"].startswith("gallery: PQ 2 x 8 bit over a 16-dim projection, trained on 56")


def test_query_ranks_by_the_gallery_quantizers_tables(dataset, model_url, gallery, tmp_path):
    qids, _, x = query_side(model_url, str(dataset))
    ids, codes = gallery_codes(gallery)
    tables = load_quantizer(require_gallery(gallery), kind="codebook").tables(x)
    scores = lut_scores(torch.from_numpy(tables), torch.from_numpy(codes.astype(np.int64))).numpy()
    positions = np.arange(len(ids))
    expected = []
    for q, qid in enumerate(qids):
        order = np.lexsort((positions, -scores[q]))[:5]
        expected += [{"query_id": qid, "rank": r, "face_id": ids[i], "score": float(scores[q, i])}
                     for r, i in enumerate(order)]
    for i, opts in enumerate([dict(rows_per_task=10 ** 6, **LOCAL), dict(rows_per_task=20, progress_interval=0.0)]):
        out = tmp_path / f"r{i}.parquet"
        query_batch(model_url, gallery, str(dataset), str(out), QueryConfig(top_k=5, **opts))
        assert_same(out, expected)


def test_the_code_source_is_fixed_per_gallery(dataset, model_url, gallery, tmp_path):
    with pytest.raises(ValueError, match="holds gallery codes; encoding into it with --codes model"):
        encode_gallery(model_url, str(dataset), gallery, ENC, out=sys.stderr)
    model_gallery = str(tmp_path / "model-codes")
    encode_gallery(model_url, str(dataset), model_gallery, ENC, out=sys.stderr)
    with pytest.raises(ValueError, match="holds model codes; encoding into it with --codes gallery"):
        encode_gallery(model_url, str(dataset), model_gallery, GALLERY_CODES, out=sys.stderr)
    assert info(model_gallery)["codes"].startswith("model")


def test_evaluate_measures_the_gallery_codes(dataset, model_url):
    state = load_checkpoint(model_url)
    model = model_from_checkpoint(state)
    split = load_split(str(dataset), "single", stored_size(state), crop_fraction=1.0)
    own, gal = (evaluate_model(model, split.queries, split.database, codes=c) for c in ("model", "gallery"))
    assert own["codes"] == "model" and gal["codes"] == "gallery"
    assert gal["float"]["map"] == own["float"]["map"]
    assert 0.0 < gal["quantized"]["map"] <= 1.0 and gal["code_spread"]["distinct_codes"] >= 1
    with pytest.raises(ValueError, match="codes must be one of"):
        evaluate_model(model, split.queries, split.database, codes="other")
