"""Evaluation stage: metrics through the report path, every method end to end on a tiny set,
DCDH Hamming ranking, face shards, and the errors for bad input."""
import io
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from model.dcdh import DCDH, DCDHConfig, hamming_distances
from model.dpq import DPQ, DPQConfig
from model.metrics import retrieval_metrics
from model.registry import METHODS
from pipelines.cli import main as opqn_main
from pipelines.evaluate.evaluation import evaluate_model, evaluate_url, load_model
from pipelines.evaluate.protocols import check_split, load_split, per_identity_split
from pipelines.evaluate.report import TIE_RULE, write_report
from pipelines.formats.checkpoint import load_checkpoint, save_checkpoint
from pipelines.photo_folder import list_identity_folder, load_face_set, query_split
from pipelines.train.local import TrainConfig, train_method


def _link_people(lfw_dir, root, people, photos):
    root.mkdir(parents=True, exist_ok=True)
    for person in people:
        (root / person).mkdir()
        for name in sorted(os.listdir(lfw_dir / person))[:photos]:
            os.symlink(lfw_dir / person / name, root / person / name)
    return root


@pytest.fixture(scope="module")
def tiny(lfw_dir, tmp_path_factory):
    """5 LFW identities x 6 photos (training / single-domain) and 4 other identities x 3 (unseen)."""
    base = tmp_path_factory.mktemp("eval_tiny")
    people = sorted(os.listdir(lfw_dir))
    many = [p for p in people if len(os.listdir(lfw_dir / p)) >= 10]
    few = [p for p in people if len(os.listdir(lfw_dir / p)) == 3]
    seen = _link_people(lfw_dir, base / "seen", many[:5], 6)
    unseen = _link_people(lfw_dir, base / "unseen", few[:4], 3)
    cfg = TrainConfig(data=str(seen), bits=16, codewords=16, dim=64, image_size=32, width=0.125, epochs=1,
                      batch_size=16, min_photos=2, threads=2, max_steps=1)
    faces = load_face_set(list_identity_folder(seen), cfg.stored_size(), cfg.crop_fraction)
    is_q = query_split(faces.labels, faces.paths, cfg.query_fraction, cfg.seed)
    return {"base": base, "seen": seen, "unseen": unseen, "cfg": cfg,
            "train": faces.subset(np.flatnonzero(~is_q)), "queries": faces.subset(np.flatnonzero(is_q))}


@pytest.fixture(scope="module")
def opqn_url(tiny):
    from dataclasses import replace
    url = str(tiny["base"] / "models" / "opqn.pt")
    train_method("opqn", replace(tiny["cfg"], model_url=url), tiny["train"], out=io.StringIO())
    return url


def test_constructed_case_metrics_through_the_report(tmp_path):
    # q0 (a): ranked a, b, a, b -> AP (1 + 2/3) / 2; q1 (b): all tied -> database order a, b, a, b -> AP 1/2
    scores = np.array([[0.9, 0.8, 0.7, 0.1], [0.5, 0.5, 0.5, 0.5]])
    m = retrieval_metrics(scores, np.array(["a", "b"]), np.array(["a", "b", "a", "b"]), ts=(1, 2, 10), pr_points=4)
    result = {"method": "x", "label": "X", "bits": 8, "ranking": "test", "quantized": m, "float": m}
    paths = write_report(tmp_path / "rep", [result], {"title": "constructed", "protocol": "single"})
    data = json.loads(open(paths["metrics"]).read())
    q = data["results"][0]["quantized"]
    assert q["map"] == pytest.approx((5 / 6 + 0.5) / 2)
    assert q["precision_at"] == pytest.approx({"1": 0.5, "2": 0.5, "10": 0.5})
    assert q["pr"]["cutoffs"] == [1, 2, 3, 4]
    assert q["pr"]["precision"] == pytest.approx([0.5, 0.5, 0.5, 0.5])
    assert q["pr"]["recall"] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert data["tie_rule"] == TIE_RULE
    for key in ("pr", "precision_at"):
        with Image.open(paths[key]) as im:
            assert im.format == "PNG" and im.size[0] > 100
    text = open(paths["report"]).read()
    assert "0.6667" in text and "ties" in text and "pr.png" in text


def test_dcdh_hamming_ranking_equals_brute_force():
    gen = torch.Generator().manual_seed(0)
    q = torch.randint(0, 2, (7, 24), generator=gen, dtype=torch.uint8)
    d = torch.randint(0, 2, (40, 24), generator=gen, dtype=torch.uint8)
    brute = (q[:, None, :] != d[None, :, :]).sum(-1)
    assert torch.equal(hamming_distances(q, d), brute.to(torch.int32))
    # through the model: codes are sign bits of the hashing layer, score = -Hamming
    torch.manual_seed(0)
    model = DCDH(DCDHConfig(num_classes=3, bits=24, D=32, image_size=32, width=0.125)).eval()
    xq, xd = torch.randn(5, 32), torch.randn(30, 32)
    codes = model.codes_from_features(xd)
    scores = model.scores(xq, codes).numpy()
    bq = (model.hash(xq) > 0).to(torch.uint8)
    expected = -(bq[:, None, :] != codes[None, :, :]).sum(-1).numpy()
    assert np.array_equal(scores, expected)
    order = np.argsort(-scores, axis=1, kind="stable")
    brute_order = np.array([sorted(range(30), key=lambda i: (-expected[r, i], i)) for r in range(5)])
    assert np.array_equal(order, brute_order)


def test_dpq_scores_are_asymmetric_distances_to_hard_codewords():
    torch.manual_seed(0)
    model = DPQ(DPQConfig(num_classes=3, M=4, K=16, D=64, image_size=32, width=0.125)).eval()
    xq, xd = torch.randn(6, 64), torch.randn(20, 64)
    codes = model.codes_from_features(xd)
    scores = model.scores(xq, codes).numpy()
    with torch.no_grad():
        soft = torch.einsum("mdk,bmk->bmd", model.C, model.assignment_logits(xq).softmax(-1)).reshape(6, -1)
        hard = torch.cat([model.C[m][:, codes[:, m].long()].T for m in range(4)], dim=1)
    assert np.allclose(scores, -torch.cdist(soft, hard).pow(2).numpy(), atol=1e-3)


def test_variant_switches_win_over_training_defaults():
    cfg = TrainConfig(bits=16, lam=0.1)
    assert cfg.network_config("W", 10).lam == 0.0 and cfg.network_config("opqn", 10).lam == 0.1
    assert cfg.network_config("l2q", 10).learn_codebooks and cfg.network_config("C", 10).classifier == "concat"
    assert cfg.network_config("dcdh", 10).D == cfg.network_config("dpq", 10).D == 512


@pytest.mark.parametrize("name", sorted(METHODS))
def test_each_method_trains_one_step_and_evaluates(tiny, name, tmp_path):
    from dataclasses import replace
    url = str(tmp_path / f"{name}.pt")
    model, info = train_method(name, replace(tiny["cfg"], model_url=url), tiny["train"], out=io.StringIO())
    assert len(info["history"]) == 1 and np.isfinite(info["history"][0]["loss"])
    r = evaluate_model(model, tiny["queries"], tiny["train"])
    assert r["method"] == name and r["bits"] == 16
    for part in ("quantized", "float"):
        assert 0 < r[part]["map"] <= 1 and r[part]["queries"] == len(tiny["queries"])
        assert set(r[part]["precision_at"]) >= {1, 5, 10, 20, 50, 100}
    # the checkpoint reproduces the same numbers through the URL path and the trainer's split
    out = evaluate_url(url, str(tiny["seen"]), None, "single", method=name)
    assert out["result"]["quantized"]["map"] == pytest.approx(r["quantized"]["map"])
    assert out["result"]["float"]["map"] == pytest.approx(r["float"]["map"], abs=1e-6)
    if METHODS[name].family != "opqn":  # baselines make no galleries: refused up front, by name
        from pipelines.encode.run import encode_gallery
        from pipelines.query.run import query_batch

        for run in (lambda: encode_gallery(url, str(tmp_path / "ds"), str(tmp_path / "g")),
                    lambda: query_batch(url, str(tmp_path / "g"), str(tmp_path / "q"), str(tmp_path / "r"))):
            with pytest.raises(ValueError, match=f"{name.upper()} checkpoint, an evaluation baseline"):
                run()


def test_cli_train_method_then_evaluate(tiny, tmp_path, capsys):
    url = str(tmp_path / "w.pt")
    assert opqn_main(["train-method", "--method", "W", "--data", str(tiny["seen"]), "--model-url", url,
                      "--bits", "16", "--codewords", "16", "--dim", "64", "--width", "0.125", "--epochs", "1",
                      "--batch-size", "16", "--min-photos", "2", "--max-steps", "1", "--threads", "2"]) == 0
    state = load_checkpoint(url)
    assert state["method"] == "W" and state["config"]["lam"] == 0.0  # the variant's switch, not --lam's default
    assert opqn_main(["evaluate", url, str(tiny["seen"]), str(tmp_path / "rep"), "--method", "W", "--ts", "1,5"]) == 0
    assert "OPQN-W 16 bit, single-domain" in capsys.readouterr().out


def test_cli_single_and_cross_reports(tiny, opqn_url, tmp_path, capsys):
    rep = tmp_path / "single"
    assert opqn_main(["evaluate", opqn_url, str(tiny["seen"]), str(rep), "--json"]) == 0
    line = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("{")][0]
    assert 0 < json.loads(line)["map"] <= 1
    for f in ("metrics.json", "report.md", "pr.png", "precision_at.png"):
        assert (rep / f).is_file()
    with Image.open(rep / "pr.png") as im:
        im.verify()
    rep = tmp_path / "cross"
    assert opqn_main(["evaluate", opqn_url, str(tiny["unseen"]), str(rep), "--protocol", "cross"]) == 0
    data = json.loads((rep / "metrics.json").read_text())
    q = data["results"][0]["quantized"]
    assert (q["queries"], q["database"]) == (4, 8)  # one query per identity, the rest database
    assert data["context"]["protocol"] == "cross"


def _write_shards(tiny, root, splits):
    import pyarrow as pa
    import pyarrow.parquet as pq
    (root / "faces").mkdir(parents=True)
    rows = {"face_id": [], "identity": [], "source": [], "split": [], "image": []}
    for faces, split in splits:
        for i in range(len(faces)):
            buf = io.BytesIO()
            Image.fromarray(faces.images[i].permute(1, 2, 0).numpy()).save(buf, format="PNG")
            rows["face_id"].append(f"{split}-{i}")
            rows["identity"].append(str(faces.labels[i]))
            rows["source"].append(faces.paths[i])
            rows["split"].append(split)
            rows["image"].append(buf.getvalue())
    half = len(rows["face_id"]) // 2
    table = pa.table(rows)
    pq.write_table(table.slice(0, half), root / "faces" / "part-00000.parquet")
    pq.write_table(table.slice(half), root / "faces" / "part-00001.parquet")
    return root


def test_several_models_share_one_split_and_one_report(tiny, opqn_url, tmp_path):
    from dataclasses import replace
    dcdh_url = str(tmp_path / "dcdh.pt")
    train_method("dcdh", replace(tiny["cfg"], model_url=dcdh_url), tiny["train"], out=io.StringIO())
    out = evaluate_url(f"{opqn_url},{dcdh_url}", str(tiny["seen"]), str(tmp_path / "rep"))
    assert [r["method"] for r in out["results"]] == ["opqn", "dcdh"]
    data = json.loads((tmp_path / "rep" / "metrics.json").read_text())
    assert [r["label"] for r in data["results"]] == ["OPQN", "DCDH"]
    assert len({(r["quantized"]["queries"], r["quantized"]["database"]) for r in data["results"]}) == 1
    assert "| DCDH | 16 |" in (tmp_path / "rep" / "report.md").read_text()


def test_face_shard_dataset_matches_the_folder(tiny, opqn_url, tmp_path):
    root = _write_shards(tiny, tmp_path / "ds", [(tiny["queries"], "query"), (tiny["train"], "database")])
    from_shards = evaluate_url(opqn_url, str(root), str(tmp_path / "rep"), "single")
    model, _, _ = load_model(opqn_url)
    direct = evaluate_model(model, tiny["queries"], tiny["train"])
    assert from_shards["context"]["split"].startswith("face shards")
    assert from_shards["result"]["quantized"]["map"] == pytest.approx(direct["quantized"]["map"])
    # the same shards hold no 'unseen' rows: the cross protocol says which splits exist
    with pytest.raises(ValueError, match=r"no faces with split 'unseen' \(splits present: \['database', 'query'\]\)"):
        evaluate_url(opqn_url, str(root), None, "cross")


def test_shards_without_the_query_split_are_rejected(tiny, opqn_url, tmp_path):
    root = _write_shards(tiny, tmp_path / "dbonly", [(tiny["train"], "database")])
    with pytest.raises(ValueError, match="no faces with split 'query'"):
        evaluate_url(opqn_url, str(root), None, "single")


def test_identities_without_database_items_are_rejected(tiny, tmp_path):
    labels = np.array(["a", "a", "b"])
    with pytest.raises(ValueError, match=r"no database items.*b \(1 photos\)"):
        per_identity_split(labels, ["a1.jpg", "a2.jpg", "b1.jpg"], queries_per_identity=1)
    q, d = tiny["queries"], tiny["train"]
    only = d.subset(np.flatnonzero(d.labels != q.labels[0]))
    with pytest.raises(ValueError, match=f"1 query identities have no database items.*{q.labels[0]}"):
        check_split(q, only)
    with pytest.raises(ValueError, match="no database items"):
        load_split(str(tiny["unseen"]), "cross", 35, 0.5, min_photos=2, queries_per_identity=3)


def test_checkpoint_whose_shape_does_not_match_its_config(opqn_url, tmp_path, capsys):
    state = load_checkpoint(opqn_url)
    state.pop("model_id")
    state.pop("format")
    state["config"] = {**state["config"], "M": 2, "D": 64}  # the weights are M=4, d=16, K=16
    bad = str(tmp_path / "bad.pt")
    save_checkpoint(bad, state)
    with pytest.raises(ValueError, match=r"do not match its OPQN config \(D=64, M=2, K=16\).*F: checkpoint \(4, 16, 16\)"):
        load_model(bad)
    assert opqn_main(["evaluate", bad, str(tmp_path), str(tmp_path / "rep")]) == 1
    assert "do not match" in capsys.readouterr().err


def test_wrong_method_and_seen_identities_are_rejected(tiny, opqn_url):
    with pytest.raises(ValueError, match="holds method 'opqn', not 'dpq'"):
        load_model(opqn_url, "dpq")
    with pytest.raises(ValueError, match="identities the model never saw"):
        evaluate_url(opqn_url, str(tiny["seen"]), None, "cross")
