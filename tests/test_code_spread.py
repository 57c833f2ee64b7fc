"""Code spread ("no sink codes"): the metrics against hand counts, the chunked counter, the
sink warning's thresholds, and the places that report it: `opqn evaluate` (a model whose
assignment head is collapsed, so every face gets one code, is flagged in the log, metrics.json
and report.md), `opqn gallery info` (live codes only) and the trainer's end-of-run metrics (train_summary)."""
import json
import math
import os
from dataclasses import asdict

import numpy as np
import pytest
import torch

from model.code_spread import SINK_MIN_ROWS, SpreadCounter, code_spread, mixed_bucket, sink_threshold, sink_warning
from model.opqn import OPQN
from pipelines.cli import main as opqn_main
from pipelines.encode.gallery_info import info
from pipelines.evaluate.evaluation import evaluate_url, train_summary
from pipelines.formats.checkpoint import save_checkpoint
from pipelines.photo_folder import list_identity_folder, load_face_set
from pipelines.train.local import TrainConfig
from test_query import make_model, write_gallery


def test_metrics_against_a_hand_count():
    # rows: (1,2) x3, (0,3) x1, (3,3) x1 -> largest bucket 3/5; 3 distinct codes
    codes = np.array([[1, 2], [1, 2], [0, 3], [1, 2], [3, 3]], dtype=np.uint8)
    s = code_spread(codes, K=4)
    assert (s["rows"], s["M"], s["K"]) == (5, 2, 4)
    assert s["largest_bucket"] == pytest.approx(0.6) and s["largest_bucket_rows"] == 3
    assert s["largest_code"] == [1, 2]
    assert s["distinct_codes"] == 3
    assert s["codewords_used"] == [3, 2]  # subspace 0 uses {0, 1, 3}, subspace 1 uses {2, 3}
    assert s["codewords_used_mean"] == pytest.approx(2.5)
    h = -(0.6 * math.log2(0.6) + 2 * 0.2 * math.log2(0.2))
    assert s["code_entropy_bits"] == pytest.approx(h)
    h0 = -(0.6 * math.log2(0.6) + 2 * 0.2 * math.log2(0.2))  # subspace 0: 1 x3, 0 x1, 3 x1
    h1 = -(0.6 * math.log2(0.6) + 0.4 * math.log2(0.4))  # subspace 1: 2 x3, 3 x2
    assert s["subspace_entropy_bits_mean"] == pytest.approx((h0 + h1) / 2)
    # extremes: all one code, all distinct
    one = code_spread(np.zeros((7, 3), np.uint8), 16)
    assert one["largest_bucket"] == 1.0 and one["distinct_codes"] == 1 and one["code_entropy_bits"] == 0.0
    assert one["codewords_used"] == [1, 1, 1]
    distinct = code_spread(np.arange(8).reshape(8, 1), 8)
    assert distinct["largest_bucket"] == pytest.approx(1 / 8) and distinct["code_entropy_bits"] == pytest.approx(3.0)
    empty = code_spread(np.zeros((0, 4), np.uint8), 256)
    assert empty["rows"] == 0 and empty["largest_bucket"] == 0.0 and sink_warning(empty) is None


def test_chunked_counter_equals_one_pass_and_wide_codes():
    rng = np.random.default_rng(0)
    pool = rng.integers(0, 256, (300, 4))
    codes = pool[rng.integers(0, len(pool), 5000)].astype(np.uint8)
    whole = code_spread(codes, 256)
    counter = SpreadCounter(4, 256)
    for c0 in range(0, len(codes), 333):
        counter.add(codes[c0:c0 + 333])
    assert counter.result() == whole
    values, counts = np.unique(codes, axis=0, return_counts=True)
    assert whole["distinct_codes"] == len(values) and whole["largest_bucket_rows"] == counts.max()
    assert whole["largest_code"] == values[counts.argmax()].tolist()
    # codes too wide to pack into one integer (8 x 16 bit) are counted by their bytes
    wide = np.array([[65535, 1, 2, 3, 4, 5, 6, 7]] * 3 + [[0] * 8], dtype=np.uint16)
    w = code_spread(wide, 1 << 16)
    assert (w["largest_bucket_rows"], w["distinct_codes"], w["largest_code"]) == (3, 2, wide[0].tolist())


def test_bad_input_is_named():
    with pytest.raises(ValueError, match=r"codes must lie in \[0, 4\), got values in \[0, 4\]"):
        code_spread(np.array([[0, 4]]), 4)
    with pytest.raises(ValueError, match="must be an \\(N, M\\) array"):
        code_spread(np.zeros(5, np.uint8), 4)
    with pytest.raises(ValueError, match="must be integers"):
        code_spread(np.zeros((2, 2), np.float32), 4)
    with pytest.raises(ValueError, match="1 <= K <= 65536"):
        SpreadCounter(2, 0)


def test_sink_warning_thresholds():
    def spread(n, in_bucket):
        return code_spread(np.concatenate([np.zeros((in_bucket, 1)), np.arange(1, n - in_bucket + 1)[:, None]])
                           .astype(np.int64), n + 1)

    assert sink_threshold(SINK_MIN_ROWS) == 0.02 and sink_threshold(SINK_MIN_ROWS - 1) == 0.10
    assert sink_warning(spread(300, 6)) is None  # 2.0 %: at the limit
    text = sink_warning(spread(300, 7))
    assert text.startswith("warning: 2.3% of the 300 database faces (7) share one code (0)")
    assert "codes-only retrieval" in text and "limit 2%" in text
    assert sink_warning(spread(50, 5)) is None  # 10 % of a small set
    assert "12.0% of the 50 database faces" in sink_warning(spread(50, 6))
    assert sink_warning(spread(1, 1)) is None  # one face shares a code with nobody
    assert sink_warning(code_spread(np.zeros((476, 4), np.uint8), 256), "faces").startswith(
        "warning: 100.0% of the 476 faces (476) share one code (0, 0, 0, 0)")


def test_one_persons_photos_sharing_a_code_are_no_sink():
    """A seen gallery's most photographed person may fill one code: only faces of different
    people in one code count as a sink when identities are known."""
    codes = np.concatenate([np.zeros((40, 2)), np.arange(1, 261)[:, None].repeat(2, 1)]).astype(np.int64)
    people = np.array(["bush"] * 40 + [f"p{i}" for i in range(260)])
    spread = code_spread(codes, 512)
    assert spread["largest_bucket_rows"] == 40 and sink_warning(spread) is not None  # without labels: flagged
    spread.update(mixed_bucket(codes, people))
    assert spread["mixed_bucket_rows"] == 0 and sink_warning(spread) is None
    mixed = people.copy()
    mixed[:10] = [f"q{i}" for i in range(10)]  # 10 other people in the same code as 30 of bush's
    spread.update(mixed_bucket(codes, mixed))
    assert spread["mixed_bucket_rows"] == 10 and spread["mixed_code"] == [0, 0]
    assert sink_warning(spread).startswith("warning: 3.3% of the 300 database faces (10 of other people than its "
                                           "commonest one) share one code (0, 0)")


@pytest.fixture(scope="module")
def collapsed(lfw_dir, tmp_path_factory):
    """An OPQN whose assignment map F is zero (every face gets code 0...0), saved as a checkpoint,
    and an identity folder of 4 LFW people x 5 photos to evaluate it on."""
    base = tmp_path_factory.mktemp("collapsed")
    people = [p for p in sorted(os.listdir(lfw_dir)) if len(os.listdir(lfw_dir / p)) >= 10][:4]
    folder = base / "faces"
    for person in people:
        (folder / person).mkdir(parents=True)
        for name in sorted(os.listdir(lfw_dir / person))[:5]:
            os.symlink(lfw_dir / person / name, folder / person / name)
    cfg = TrainConfig(data=str(folder), bits=16, codewords=16, dim=64, width=0.125, image_size=32, min_photos=2)
    torch.manual_seed(0)
    model = OPQN(cfg.opqn_config(len(people)))
    with torch.no_grad():
        model.F.zero_()
    url = str(base / "collapsed.pt")
    save_checkpoint(url, {"method": "opqn", "config": model.cfg.to_dict(), "train": asdict(cfg), "classes": people,
                          "model": model.state_dict(), "epoch": 1, "history": []})
    return {"url": url, "folder": folder, "model": model.eval(), "cfg": cfg}


def test_collapsed_model_is_flagged_by_evaluate(collapsed, tmp_path, caplog, capsys):
    report = tmp_path / "report"
    with caplog.at_level("WARNING", logger="pipelines.evaluate.evaluation"):
        out = evaluate_url(collapsed["url"], str(collapsed["folder"]), str(report), "single", min_photos=2,
                           query_fraction=0.2)
    result = out["result"]
    n = result["quantized"]["database"]
    spread = result["code_spread"]
    assert spread["largest_bucket"] == 1.0 and spread["largest_bucket_rows"] == n == 16
    assert spread["distinct_codes"] == 1 and spread["codewords_used"] == [1] * 4
    assert spread["largest_code"] == [0, 0, 0, 0] and spread["code_entropy_bits"] == 0.0
    # 4 people x 4 database faces in one code: 12 faces are of other people than its commonest one
    expected = (f"warning: 75.0% of the {n} database faces (12 of other people than its commonest one) "
                f"share one code (0, 0, 0, 0)")
    assert result["warnings"] and result["warnings"][0].startswith(expected)
    assert any(expected in r.getMessage() and r.levelname == "WARNING" for r in caplog.records)
    metrics = json.loads((report / "metrics.json").read_text())
    assert metrics["results"][0]["code_spread"]["largest_bucket"] == 1.0
    assert metrics["results"][0]["warnings"][0].startswith(expected)
    text = (report / "report.md").read_text()
    assert "## Code spread (database codes)" in text and "100.0% of 16" in text and expected in text
    # the command line: the JSON line carries the share and the warning
    assert opqn_main(["evaluate", collapsed["url"], str(collapsed["folder"]), str(tmp_path / "cli"), "--min-photos",
                      "2", "--json"]) == 0
    line = json.loads(capsys.readouterr().out.splitlines()[0])
    assert line["largest_bucket"] == 1.0 and line["warnings"][0].startswith(expected)


def test_a_spread_model_is_not_flagged_and_train_summary_reports_spread(collapsed):
    cfg = collapsed["cfg"]
    faces = load_face_set(list_identity_folder(collapsed["folder"]), cfg.stored_size(), cfg.crop_fraction)
    queries, database = faces.subset(np.arange(0, 20, 5)), faces.subset(np.setdiff1d(np.arange(20), np.arange(0, 20, 5)))
    r = train_summary(collapsed["model"], queries, database)
    assert r["largest_bucket"] == 1.0 and r["code_entropy_bits"] == 0.0
    assert r["code_spread"]["distinct_codes"] == 1 and r["codewords_used_per_subspace"] == 1.0
    torch.manual_seed(1)
    random_head = OPQN(collapsed["model"].cfg).eval()  # random F: codes spread over the codewords
    r = train_summary(random_head, queries, database)
    from model.features import embed
    codes = random_head.codes_from_features(embed(random_head, database.images)).numpy()
    assert r["code_spread"] == code_spread(codes, 16)
    assert r["codewords_used_per_subspace"] == pytest.approx(np.mean([len(np.unique(c)) for c in codes.T]))


def test_gallery_info_reports_the_spread_of_live_codes(tmp_path):
    model_url, model_id = make_model(tmp_path / "m.pt", 16)
    codes = np.array([[1, 2, 3, 4]] * 9 + [[0, 0, 0, 0]] * 3 + [[5, 5, 5, 5]] * 8, dtype=np.uint8)
    face_ids = [f"f{i:02d}" for i in range(len(codes))]
    dead = face_ids[:5]  # five of the nine (1, 2, 3, 4) faces are deleted: (5, 5, 5, 5) is then the largest
    url = write_gallery(str(tmp_path / "g"), model_id, 16, codes, face_ids, [7, 7, 6], tombstones=dead)
    shown = info(url)
    live = code_spread(codes[5:], 16)
    assert shown["faces"] == 20 and shown["deleted"] == 5 and shown["live_faces"] == 15
    assert shown["largest_bucket"] == pytest.approx(8 / 15, abs=1e-6) and shown["largest_bucket_rows"] == 8
    assert shown["largest_code"] == [5, 5, 5, 5] and shown["distinct_codes"] == 3
    assert shown["codewords_used"] == live["codewords_used"]
    assert shown["code_entropy_bits"] == pytest.approx(live["code_entropy_bits"], abs=1e-4)
    assert shown["warning"].startswith("warning: 53.3% of the 15 live gallery faces (8) share one code (5, 5, 5, 5)")
    assert shown["refine"].startswith("none")


def test_gallery_info_command_prints_the_spread(tmp_path, capsys):
    model_url, model_id = make_model(tmp_path / "m.pt", 16)
    rng = np.random.default_rng(3)
    codes = rng.integers(0, 16, (40, 4)).astype(np.uint8)
    url = write_gallery(str(tmp_path / "g"), model_id, 16, codes, [f"f{i}" for i in range(40)], [40])
    assert opqn_main(["gallery", "info", url]) == 0
    printed = dict(line.split(": ", 1) for line in capsys.readouterr().out.splitlines())
    s = code_spread(codes, 16)
    assert printed["largest_bucket_rows"] == str(s["largest_bucket_rows"])
    assert printed["distinct_codes"] == str(s["distinct_codes"]) and "warning" not in printed
