"""The main job end to end (`opqn pipeline`) on a tiny LFW photo tree, its re-run, the Prefect
flow's parameter check, and the README's commands against what CI runs."""
from __future__ import annotations

import io
import json
import re
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipelines.formats.checkpoint import load_checkpoint
from pipelines.formats.gallery import require_gallery
from pipelines.main_job.run import PipelineConfig, run_pipeline

REPO = Path(__file__).resolve().parent.parent
TINY = dict(min_photos=10, crop_size=40, bits=16, codewords=16, width=0.125, epochs=2, batch_size=32,
            workers=2, top_k=20, view_queries=5, view_top_k=4)


def photo_tree(lfw_dir: Path, dest: Path, identities: int, photos: int, small: int = 0) -> Path:
    """``identities`` LFW people with ``photos`` photos each (+ ``small`` people with 3 photos)."""
    people = [d for d in sorted(lfw_dir.iterdir()) if len(list(d.glob("*.jpg"))) >= photos]
    few = [d for d in sorted(lfw_dir.iterdir()) if len(list(d.glob("*.jpg"))) == 3][:small]
    for person, n in [(p, photos) for p in people[:identities]] + [(p, 3) for p in few]:
        (dest / person.name).mkdir(parents=True)
        for f in sorted(person.glob("*.jpg"))[:n]:
            shutil.copy(f, dest / person.name / f.name)
    return dest


def test_pipeline_end_to_end_then_rerun_does_only_the_cheap_stages(tmp_path, lfw_dir, ray_local, monkeypatch):
    data = photo_tree(lfw_dir, tmp_path / "photos", identities=5, photos=10, small=2)
    monkeypatch.chdir(tmp_path)  # a relative work folder: Ray Train's workers run in folders of their own
    cfg = PipelineConfig(data=str(data), workdir="work", **TINY)
    log = io.StringIO()
    first = run_pipeline(cfg, out=log)
    s, where = first["stages"], first["urls"]
    assert where["model"] == str(tmp_path / "work" / "model.pt")

    # every photo ends in faces or rejects: the 2 three-photo people are rejected before detection
    assert s["prepare"]["photos"] == 56
    assert s["prepare"]["rejected_by_reason"].get("too_few_photos") == 6
    assert s["prepare"]["faces_written"] + s["prepare"]["rejected"] == 56
    faces = pq.read_table(Path(where["dataset"]) / "faces").to_pandas()
    queries = faces[faces.split == "query"]
    database = faces[faces.split == "database"]
    assert len(queries) > 0 and len(database) > 0 and faces.identity.nunique() == 5

    state = load_checkpoint(where["model"])
    assert state["epoch"] == 2 and len(state["classes"]) == 5
    gallery = require_gallery(s["encode"]["gallery"])
    assert gallery.rows == len(database) and gallery.model_id == state["model_id"]
    assert (gallery.M, gallery.K) == (4, 16)

    results = pq.read_table(where["results"]).to_pandas()
    assert set(results.query_id) == set(queries.face_id)
    assert len(results) == len(queries) * min(TINY["top_k"], len(database))
    assert set(results.face_id) <= set(database.face_id)

    metrics = json.loads((Path(where["report"]) / "metrics.json").read_text())
    assert metrics, "empty metrics.json"
    assert 0.0 <= s["evaluate"]["map"] <= 1.0 and s["evaluate"]["queries"] == len(queries)
    html = Path(where["viewer"]).read_text()
    assert html.count("data:image/") >= TINY["view_queries"] * (1 + TINY["view_top_k"])
    assert s["view"]["queries_shown"] == TINY["view_queries"]
    text = log.getvalue()
    assert "[pipeline] done in" in text and where["viewer"] in text and "mAP" in text
    # summary.json in the work folder: stages in order with their counts, metrics and times, and every URL
    summary = json.loads((tmp_path / "work" / "summary.json").read_text())
    assert list(summary["stages"]) == ["prepare", "train", "encode", "query", "evaluate", "view"]
    assert summary["urls"] == where and where["summary"] == str(tmp_path / "work" / "summary.json")
    assert summary["stages"]["evaluate"]["map"] == s["evaluate"]["map"]
    assert summary["stages"]["prepare"]["photos"] == 56 and summary["stages"]["train"]["epochs"] == 2
    assert all(stage["seconds"] >= 0 for stage in summary["stages"].values()) and summary["seconds"] > 0

    # A re-run (after a crash, or to refresh): nothing to prepare, train or encode again.
    first_results = pq.read_table(where["results"])
    again = run_pipeline(cfg, out=io.StringIO())["stages"]
    assert again["prepare"]["processed"] == 0 and again["prepare"]["faces_written"] == 0
    assert again["train"]["epochs"] == 2
    assert load_checkpoint(where["model"])["model_id"] == state["model_id"]
    assert again["encode"]["encoded_now"] == 0 and again["encode"]["gallery_codes"] == gallery.rows
    assert pq.read_table(where["results"]).equals(first_results)  # same model, same gallery: same ranking
    assert again["evaluate"]["map"] == pytest.approx(s["evaluate"]["map"])

    # Training further makes another model: it gets a gallery of its own, the old one is kept.
    more = run_pipeline(PipelineConfig(data=str(data), workdir="work", **{**TINY, "epochs": 3}), out=io.StringIO())
    third = more["stages"]
    assert third["train"]["epochs"] == 3 and third["encode"]["gallery"] != s["encode"]["gallery"]
    assert third["encode"]["encoded_now"] == len(database)
    assert require_gallery(s["encode"]["gallery"]).rows == gallery.rows


def test_pipeline_flow_rejects_unknown_options_before_anything_runs(tmp_path):
    from flows.pipeline import opqn_pipeline_flow

    with pytest.raises(ValueError, match="unknown pipeline options"):
        opqn_pipeline_flow.fn(data=str(tmp_path), workdir=str(tmp_path / "w"), options={"epoch": 3})


def test_pipeline_missing_data_names_the_setting(tmp_path, monkeypatch):
    monkeypatch.setenv("OPQN_DATA", str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="OPQN_DATA"):
        run_pipeline(PipelineConfig(workdir=str(tmp_path / "w")), out=io.StringIO())


def readme_commands() -> list[str]:
    """The command lines of the README's "Two commands" block."""
    text = (REPO / "README.md").read_text()
    block = re.search(r"## Two commands.*?```bash\n(.*?)```", text, re.S)
    assert block, "README.md has no '## Two commands' section with a bash block"
    return [line.strip() for line in block.group(1).splitlines() if line.strip() and not line.startswith("#")]


def test_readme_test_command_is_what_ci_runs():
    main, tests = readme_commands()
    ci = [line.strip() for line in (REPO / ".ci" / "run").read_text().splitlines()
          if line.strip() and not line.startswith("#") and not line.startswith(("set ", "cd "))]
    assert ci == [tests], f".ci/run runs {ci}, README says {tests!r}"
    assert main.startswith("bash infra/setup.sh") and "opqn pipeline" in main
