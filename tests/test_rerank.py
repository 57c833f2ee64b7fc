"""Exact re-rank: float features stored beside the codes (`opqn encode --store-features`) and the
query stage's `--rerank R` (PQ top-R re-scored by the cosine of the float features).

Real face shards from LFW, a tiny trained OPQN, real Ray (Ray Data encode, Ray query tasks);
every result is compared with a brute-force numpy computation over the stored files."""
import argparse
import os
import shutil
import subprocess
import sys
from dataclasses import asdict

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F

from face_datasets import write_face_dataset
from test_query import assert_same
from model.opqn import OPQN, VARIANTS, OPQNConfig
from model.scoring import lut_scores
from pipelines.formats.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint, training_state
from pipelines.encode.gallery_info import info
from pipelines.encode.run import EncodeConfig, encode_gallery
from pipelines.formats.gallery import (FEATURE_ROW_GROUP, deleted_ids, feature_path, load_quantizer, read_codes,
                                       read_features, read_refine, require_gallery)
from pipelines.formats.gallery_writer import compact, delete_faces
from pipelines.formats.checkpoint import stored_size
from pipelines.query.run import QueryConfig, query_batch, query_inputs
from pipelines.query.source import load_queries
from pipelines.config_flags import config_from_args
from pipelines.train.recipe import make_optimizer
from model.features import embed
from pipelines.train.local import TrainConfig, train_local
from storage.manifest import read_manifest
from storage.tables import read_table

ENC = EncodeConfig(splits=("database",), batch_size=8, shard_rows=10)
LOCAL = dict(executor="local", progress_interval=0.0)


pytestmark = pytest.mark.usefixtures("ray_local")


@pytest.fixture(scope="module")
def dataset(lfw_dir, tmp_path_factory):
    """8 identities x 8 photos in 3 face shards: 8 queries, 56 database faces."""
    return write_face_dataset(tmp_path_factory.mktemp("rerank") / "ds", lfw_dir, identities=8, photos=8, shards=3)


def tiny_model(dataset, folder, codewords: int = 16, dim: int = 64) -> str:
    """A 16-bit OPQN trained for one epoch on ``dataset``, saved in ``folder``; its URL."""
    url = str(folder / "m.pt")
    train_local(TrainConfig(data=str(dataset), model_url=url, bits=16, codewords=codewords, dim=dim, width=0.125,
                            epochs=1, batch_size=16), evaluate=False)
    return url


@pytest.fixture(scope="module")
def model_url(dataset, tmp_path_factory):
    return tiny_model(dataset, tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module")
def gallery_with_features(dataset, model_url, tmp_path_factory):
    url = str(tmp_path_factory.mktemp("gf") / "gallery")
    summary = encode_gallery(model_url, str(dataset), url, EncodeConfig(**{**asdict(ENC), "store_features": True}),
                             out=sys.stderr)
    assert summary["faces"] == 56 and summary["store_features"]
    return url


@pytest.fixture(scope="module")
def gallery_codes_only(dataset, model_url, tmp_path_factory):
    url = str(tmp_path_factory.mktemp("gc") / "gallery")
    encode_gallery(model_url, str(dataset), url, ENC, out=sys.stderr)
    return url


def paired_arrays(gallery_url, kind):
    """(face ids, codes (N, M), paired rows) in gallery order (shard, row): ``kind`` "features"
    (float16 (N, D)) or "refine" (uint8 (N, B)); each paired shard is checked row for row."""
    g = require_gallery(gallery_url)
    paired_urls, read = ((g.feature_urls(), lambda u: read_features(u, g.D)) if kind == "features"
                         else (g.refine_urls(), lambda u: read_refine(u, g.refine_bytes)))
    ids, codes, rows = [], [], []
    for code_url, paired_url in zip(g.shard_urls(), paired_urls, strict=True):
        fid, c = read_codes(code_url, g.M)
        pfid, r = read(paired_url)
        assert fid.equals(pfid), f"{paired_url} is not aligned with {code_url}"
        ids += fid.to_pylist()
        codes.append(c)
        rows.append(r)
    return ids, np.concatenate(codes), np.concatenate(rows)


def gallery_arrays(gallery_url):
    """(face ids, codes (N, M), stored features (N, D) float16) in gallery order (shard, row)."""
    return paired_arrays(gallery_url, "features")


def query_side(model_url, queries):
    state = load_checkpoint(model_url)
    ids, images = load_queries(queries, "query", stored_size(state))
    tables, x = query_inputs(model_from_checkpoint(state), images, 64)
    return ids, tables, x


def brute_force(model_url, queries, gallery_url, k, R, deleted=(), kind="features"):
    """PQ top-R (LUT score desc, position asc) re-scored in numpy by the dot product of the
    normalised query feature with each candidate's stored vector: its normalised float16 feature
    (the cosine), or with ``kind`` "refine" its refine code decoded by the gallery's quantizer;
    then the top-k by (score desc, position asc)."""
    qids, tables, x = query_side(model_url, queries)
    face_ids, codes, stored = paired_arrays(gallery_url, kind)
    pq_scores = lut_scores(torch.from_numpy(tables), torch.from_numpy(codes.astype(np.int64))).numpy()
    if kind == "features":
        f = stored.astype(np.float64)
        f /= np.linalg.norm(f, axis=1, keepdims=True)
    else:
        f = load_quantizer(require_gallery(gallery_url)).decode(stored)  # (N, D) float64
    live = np.flatnonzero(~np.isin(np.asarray(face_ids), list(deleted)))
    rows = []
    for q, qid in enumerate(qids):
        cand = live[np.lexsort((live, -pq_scores[q, live]))][:R]
        xq = x[q].astype(np.float64) / np.linalg.norm(x[q].astype(np.float64))
        cos = (f[cand] @ xq).astype(np.float32)
        order = np.lexsort((cand, -cos))[:k]
        rows += [{"query_id": qid, "rank": r, "face_id": face_ids[cand[i]], "score": float(cos[i])}
                 for r, i in enumerate(order)]
    return rows


def test_features_are_the_evaluation_float_feature_and_codes_are_unchanged(
        dataset, model_url, gallery_with_features, gallery_codes_only):
    g = require_gallery(gallery_with_features)
    assert g.has_features and len(g.features) == len(g.shards) >= 6  # 3 sources x 2 shards of <= 10 rows
    assert [f.path for f in g.features] == [feature_path(s.path) for s in g.shards]
    assert read_manifest(gallery_with_features).metadata["features"] == {"dtype": "float16", "normalized": True}
    schema = pq.read_schema(g.feature_urls()[0])
    assert str(schema.field("feature").type) == "fixed_size_list<element: halffloat>[64]"
    assert schema.field("face_id").type == pa.string()
    # codes-only galleries are exactly what they were: no features entry, no feature files
    plain = require_gallery(gallery_codes_only)
    assert not plain.has_features and "features" not in read_manifest(gallery_codes_only).metadata
    assert not any(f.path.startswith("features/") for f in read_manifest(gallery_codes_only).files)
    ids, codes, feats = gallery_arrays(gallery_with_features)
    plain_codes = {}
    for url in plain.shard_urls():
        fid, c = read_codes(url, plain.M)
        plain_codes.update(zip(fid.to_pylist(), c.tolist()))
    assert {f: c.tolist() for f, c in zip(ids, codes)} == plain_codes
    # the stored vector is F.normalize(embed(model, image)), the float upper bound of evaluation
    faces = pq.read_table(dataset / "faces").to_pydict()
    state = load_checkpoint(model_url)
    from pipelines.formats.faces import decode_batch
    images = torch.from_numpy(decode_batch(faces["image"], stored_size(state)))
    x = F.normalize(embed(model_from_checkpoint(state), images), dim=1).numpy()
    row = {f: i for i, f in enumerate(faces["face_id"])}
    expected = x[[row[f] for f in ids]]
    np.testing.assert_allclose(feats.astype(np.float32), expected, atol=2e-3, rtol=0)
    assert feats.dtype == np.float16
    summary = info(gallery_with_features)
    assert summary["feature_bytes"] == sum(f.size for f in g.features) > summary["bytes"]
    assert summary["features"].startswith("float16 x 64")
    assert info(gallery_codes_only)["feature_bytes"] == 0 and "none" in info(gallery_codes_only)["features"]


def test_rerank_is_the_exact_order_of_the_pq_candidates(dataset, model_url, gallery_with_features, tmp_path):
    expected = brute_force(model_url, str(dataset), gallery_with_features, k=5, R=12)
    # and it is not just the PQ order: the exact re-score changes the ranking of some query
    pq_only = query_batch(model_url, gallery_with_features, str(dataset), str(tmp_path / "pq.parquet"),
                          QueryConfig(top_k=5, **LOCAL))
    assert pq_only["rerank"] == 0
    assert [r["face_id"] for r in read_table(str(tmp_path / "pq.parquet")).to_pylist()] != \
           [r["face_id"] for r in expected]
    summary = assert_same_for_any_grouping(model_url, dataset, gallery_with_features, tmp_path, expected,
                                           rerank=12)
    assert summary["rerank"] == 12


def assert_same_for_any_grouping(model_url, dataset, gallery, tmp_path, expected, **rerank):
    """Top-5 queries re-ranked (``rerank``: ``rerank=R`` or ``refine=R``) with all shards in one
    local task, one shard per task, and on Ray tasks: each equals ``expected``, and all are the
    same file contents. Returns the last summary."""
    outputs = []
    runs = [dict(rows_per_task=10 ** 6, **LOCAL), dict(rows_per_task=1, **LOCAL),
            dict(rows_per_task=20, max_in_flight=2, progress_interval=0.0)]  # the last on Ray tasks
    for i, opts in enumerate(runs):
        out = tmp_path / f"r{i}.parquet"
        summary = query_batch(model_url, gallery, str(dataset), str(out), QueryConfig(top_k=5, **rerank, **opts))
        assert summary["result_rows"] == 8 * 5
        assert_same(out, expected)
        outputs.append(read_table(str(out)))
    assert summary["tasks"] > 1
    assert all(o.equals(outputs[0]) for o in outputs)
    return summary


def test_rerank_deeper_than_the_gallery_is_exact_float_search(dataset, model_url, gallery_with_features, tmp_path):
    out = tmp_path / "r.parquet"
    query_batch(model_url, gallery_with_features, str(dataset), str(out),
                QueryConfig(top_k=56, rerank=1000, rows_per_task=25, progress_interval=0.0))
    got = read_table(str(out)).to_pylist()
    assert len(got) == 8 * 56
    # exact float search over every stored feature, independent of the codes
    qids, _, x = query_side(model_url, str(dataset))
    face_ids, _, feats = gallery_arrays(gallery_with_features)
    f = feats.astype(np.float64)
    f /= np.linalg.norm(f, axis=1, keepdims=True)
    cos = (x.astype(np.float64) / np.linalg.norm(x.astype(np.float64), axis=1, keepdims=True)) @ f.T
    cos = cos.astype(np.float32)
    for q, qid in enumerate(qids):
        mine = [r for r in got if r["query_id"] == qid]
        order = np.lexsort((np.arange(len(face_ids)), -cos[q]))
        assert [r["face_id"] for r in mine] == [face_ids[i] for i in order]
        np.testing.assert_allclose([r["score"] for r in mine], cos[q, order], atol=1e-6, rtol=0)
    # and the float16 storage costs little against the float32 features
    state = load_checkpoint(model_url)
    faces = pq.read_table(dataset / "faces").to_pydict()
    from pipelines.formats.faces import decode_batch
    db = [i for i, s in enumerate(faces["split"]) if s == "database"]
    images = torch.from_numpy(decode_batch([faces["image"][i] for i in db], stored_size(state)))
    xd = F.normalize(embed(model_from_checkpoint(state), images), dim=1).numpy()
    col = {faces["face_id"][i]: j for j, i in enumerate(db)}
    exact32 = F.normalize(torch.from_numpy(x), dim=1).numpy() @ xd[[col[fid] for fid in face_ids]].T
    np.testing.assert_allclose(cos, exact32, atol=2e-3, rtol=0)


def test_gallery_without_features_refuses_rerank(dataset, model_url, gallery_codes_only, tmp_path):
    out = tmp_path / "r.parquet"
    with pytest.raises(ValueError, match=rf"gallery {gallery_codes_only} has no stored float features.*"
                                         r"--store-features"):
        query_batch(model_url, gallery_codes_only, str(dataset), str(out), QueryConfig(top_k=5, rerank=10, **LOCAL))
    assert not out.exists()
    with pytest.raises(ValueError, match=r"rerank R=3 must be >= top_k=5"):
        QueryConfig(top_k=5, rerank=3)
    with pytest.raises(ValueError, match="rerank must be >= 0"):
        QueryConfig(rerank=-1)


def test_mixing_codes_only_and_features_in_one_gallery_is_refused(dataset, model_url, gallery_with_features,
                                                                   gallery_codes_only, tmp_path):
    for url in (gallery_with_features, gallery_codes_only):
        before = read_manifest(url)
        with pytest.raises(ValueError, match="either with or without features|without float features"):
            encode_gallery(model_url, str(dataset), url,
                           EncodeConfig(**{**asdict(ENC), "store_features": not require_gallery(url).has_features}))
        assert read_manifest(url) == before
    # a gallery's first encode fixes the setting, even while it holds only part of the dataset
    fresh = str(tmp_path / "g")
    encode_gallery(model_url, str(dataset), fresh, EncodeConfig(**{**asdict(ENC), "max_sources": 1}), out=sys.stderr)
    with pytest.raises(ValueError, match=f"gallery {fresh} was encoded without float features"):
        encode_gallery(model_url, str(dataset), fresh, EncodeConfig(**{**asdict(ENC), "store_features": True}))
    assert len(require_gallery(fresh).encoded_sources) == 1


def delete_and_compact(model_url, dataset, source, tmp_path, kind, brute, **rerank):
    """Copy gallery ``source``, delete every third face, check a re-ranked query (``rerank``:
    ``rerank=R`` or ``refine=R``) against ``brute``; compact, check that the paired ``kind``
    shards ("features" or "refine") still hold their faces' rows, row for row, and query again.
    Returns the compacted gallery."""
    gallery = str(tmp_path / "gallery")
    shutil.copytree(source, gallery)
    ids, _, rows = paired_arrays(gallery, kind)
    before = dict(zip(ids, rows))
    gone = sorted(ids)[::3]
    delete_faces(gallery, gone)
    out = tmp_path / "r.parquet"
    cfg = QueryConfig(top_k=6, **rerank, **LOCAL)
    query_batch(model_url, gallery, str(dataset), str(out), cfg)
    assert not set(gone) & set(read_table(str(out)).column("face_id").to_pylist())
    assert_same(out, brute(model_url, str(dataset), gallery, k=6, R=cfg.depth, deleted=gone))

    result = compact(gallery)
    assert result["removed_faces"] == len(gone)
    g = require_gallery(gallery)
    assert not g.tombstones and not deleted_ids(g) and g.rows == 56 - len(gone)
    listed = [f.path for f in read_manifest(gallery).files]
    assert sum(p.startswith(f"{kind}/") for p in listed) == len(g.shards)  # old paired shards unlisted
    after_ids, _, after_rows = paired_arrays(gallery, kind)  # checks each pair row for row
    assert set(after_ids) == set(ids) - set(gone)
    for fid, r in zip(after_ids, after_rows):
        np.testing.assert_array_equal(r, before[fid])
    query_batch(model_url, gallery, str(dataset), str(out), cfg)
    assert_same(out, brute(model_url, str(dataset), gallery, k=6, R=cfg.depth))
    return gallery


def test_delete_and_compact_keep_features_aligned_with_codes(dataset, model_url, gallery_with_features, tmp_path):
    gallery = delete_and_compact(model_url, dataset, gallery_with_features, tmp_path, "features", brute_force,
                                 rerank=15)
    g = require_gallery(gallery)
    for code_url, feature_url in zip(g.shard_urls(), g.feature_urls(), strict=True):
        assert read_table(code_url, columns=["face_id"]).column(0).equals(
            read_table(feature_url, columns=["face_id"]).column(0))
        assert pq.ParquetFile(feature_url).metadata.row_group(0).num_rows <= FEATURE_ROW_GROUP
    assert info(gallery)["feature_bytes"] == sum(f.size for f in g.features)


def encode_query_parser() -> argparse.ArgumentParser:
    """The `opqn encode` and `opqn query` argument parsers, as the command line builds them."""
    from pipelines.encode.cli import register as register_encode
    from pipelines.query.cli import register as register_query

    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    register_encode(sub)
    register_query(sub)
    return parser


def test_cli_switches_and_checkpoint_config_round_trip(tmp_path):
    parser = encode_query_parser()
    assert config_from_args(EncodeConfig, parser.parse_args(["encode", "m", "d", "g", "--store-features"])).store_features
    assert not config_from_args(EncodeConfig, parser.parse_args(["encode", "m", "d", "g"])).store_features
    q = config_from_args(QueryConfig, parser.parse_args(["query", "m", "g", "q", "r", "--top-k", "10", "--rerank", "200"]))
    assert (q.top_k, q.rerank) == (10, 200)
    assert QueryConfig().rerank == 0 and EncodeConfig().store_features is False


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_opqn_config_of_every_variant_round_trips_through_the_checkpoint(variant, tmp_path):
    from pipelines.formats.checkpoint import checkpoint_method

    cfg = TrainConfig(bits=16, codewords=16, dim=0, width=0.125, image_size=32, variant=variant, r=20.0, u=0.5,
                      lam=0.2)
    model = OPQN(cfg.opqn_config(3))
    assert model.cfg.variant == variant and model.cfg.D == 64  # dim 0: D = M * K, stored resolved
    if variant == "W":
        assert model.cfg.lam == 0.0
    opt, sched = make_optimizer(model, cfg)
    url = str(tmp_path / "m.pt")
    save_checkpoint(url, training_state(model, opt, sched, epoch=1, history=[], classes=list("abc"),
                                        train=asdict(cfg)))
    state = load_checkpoint(url)
    assert state["config"] == model.cfg.to_dict() and state["train"] == asdict(cfg)
    assert OPQNConfig.from_dict(state["config"]) == model.cfg
    assert model_from_checkpoint(state).cfg == model.cfg
    rebuilt, method = model_from_checkpoint(state), checkpoint_method(state)
    assert rebuilt.cfg == model.cfg and method.name == variant
    for key, value in model.state_dict().items():
        torch.testing.assert_close(rebuilt.state_dict()[key], value, msg=key)
    # a switch that is no variant's: the query-table definition
    other = OPQN(OPQNConfig(**{**model.cfg.to_dict(), "query_normalize": False}))
    save_checkpoint(url, training_state(other, *make_optimizer(other, cfg), epoch=1, history=[],
                                        classes=list("abc"), train=asdict(cfg)))
    assert model_from_checkpoint(load_checkpoint(url)).cfg.query_normalize is False


def test_s3_gallery_with_features_and_rerank_on_ray_workers(s3_bucket, dataset, model_url, tmp_path, ray_cluster):
    from storage import urls

    fs, root = urls.resolve(s3_bucket)
    fs.put(str(dataset / "faces"), f"{root}/ds/faces", recursive=True)
    gallery = f"{s3_bucket}/gallery"
    cmd = [sys.executable, "-m", "pipelines.cli", "encode", model_url, f"{s3_bucket}/ds", gallery,
           "--batch-size", "8", "--splits", "database", "--shard-rows", "10", "--store-features"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "RAY_ADDRESS": ray_cluster})
    assert out.returncode == 0, out.stderr[-3000:]
    shown = subprocess.run([sys.executable, "-m", "pipelines.cli", "gallery", "info", gallery],
                           capture_output=True, text=True, timeout=120)
    assert "faces: 56" in shown.stdout and "features: float16 x 64" in shown.stdout
    assert "feature_bytes: " in shown.stdout and "feature_bytes: 0" not in shown.stdout
    results = f"{s3_bucket}/results/r.parquet"
    summary = query_batch(model_url, gallery, str(dataset), results,
                          QueryConfig(top_k=4, rerank=10, rows_per_task=20, progress_interval=0.0))
    assert summary["tasks"] > 1
    assert_same(results, brute_force(model_url, str(dataset), gallery, k=4, R=10))
