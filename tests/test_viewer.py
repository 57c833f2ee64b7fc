"""The results viewer (`opqn view`): one self-contained HTML page, checked by parsing it and by
rendering it in headless Chromium (the faces must actually decode and show)."""
from __future__ import annotations

import argparse
import base64
import io
import json
import os
import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from model.metrics import retrieval_metrics
from pipelines.view import cli as view_cli
from pipelines.view import page as viewer
from pipelines.evaluate.report import write_report
from tests.face_datasets import write_face_dataset

# the query results contract (docs/architecture.md), written here directly so this test does
# not depend on training a model and running the query stage
RESULT_SCHEMA = pa.schema([("query_id", pa.string()), ("rank", pa.int32()), ("face_id", pa.string()),
                           ("score", pa.float32())])
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
TOP_K = 4


@pytest.fixture(scope="module")
def dataset(lfw_dir, tmp_path_factory):
    """3 LFW identities x 4 photos (1 query each) in 2 shards, and {face_id: row} of it."""
    root = write_face_dataset(tmp_path_factory.mktemp("viewer") / "ds", lfw_dir, identities=3, photos=4,
                              size=40, shards=2)
    rows = pa.concat_tables([pq.read_table(p) for p in sorted((root / "faces").glob("*.parquet"))]).to_pylist()
    return root, {r["face_id"]: r for r in rows}


def make_results(faces: dict, path: Path, extra: dict | None = None) -> dict:
    """Per query: the database faces interleaved other, same, other, same... so every query has
    correct and incorrect results; rows written in shuffled order. Returns {query: [face ids by rank]}."""
    queries = sorted(f for f, r in faces.items() if r["split"] == "query")
    ranked = {}
    for q in queries:
        database = [f for f, r in faces.items() if r["split"] == "database"]
        same = sorted(f for f in database if faces[f]["identity"] == faces[q]["identity"])
        other = sorted(f for f in database if faces[f]["identity"] != faces[q]["identity"])
        ranked[q] = [f for pair in zip(other, same) for f in pair][:TOP_K + 1]  # one more than shown
    ranked.update(extra or {})
    rows = [{"query_id": q, "rank": i, "face_id": f, "score": 1.0 - 0.1 * i} for q, ids in ranked.items()
            for i, f in enumerate(ids)]
    rows = [rows[i] for i in np.random.default_rng(0).permutation(len(rows))]
    pq.write_table(pa.Table.from_pylist(rows, schema=RESULT_SCHEMA), path)
    return ranked


@pytest.fixture(scope="module")
def report_dir(tmp_path_factory):
    scores = np.array([[0.9, 0.8, 0.7, 0.1], [0.5, 0.5, 0.5, 0.5]])
    m = retrieval_metrics(scores, np.array(["a", "b"]), np.array(["a", "b", "a", "b"]), ts=(1, 2, 10), pr_points=4)
    out = tmp_path_factory.mktemp("viewer") / "report"
    write_report(out, [{"method": "opqn", "label": "OPQN", "bits": 32, "quantized": m, "float": m}],
                 {"title": "viewer test", "protocol": "single"})
    return out


class Page(HTMLParser):
    """What the viewer's HTML holds: query blocks, result figures, images, marks."""

    def __init__(self, text: str):
        super().__init__()
        self.queries, self.results, self.imgs, self.marks, self.tags = [], [], [], [], set()
        self._in_mark = False
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.add(tag)
        classes = (a.get("class") or "").split()
        if tag == "section" and "query" in classes:
            self.queries.append({"id": a["data-query-id"], "identity": None, "results": []})
        elif tag == "figure" and "query-face" in classes:
            self.queries[-1]["identity"] = a["data-identity"]
        elif tag == "figure" and "result" in classes:
            cell = {"state": classes[1], "rank": int(a["data-rank"]), "face_id": a["data-face-id"],
                    "identity": a["data-identity"]}
            self.results.append(cell)
            self.queries[-1]["results"].append(cell)
        elif tag == "img":
            self.imgs.append(a)
        self._in_mark = tag == "span" and "mark" in classes

    def handle_data(self, data):
        if self._in_mark:
            self.marks.append(data)
            self._in_mark = False


def test_page_structure_marks_and_embedded_bytes(dataset, report_dir, tmp_path):
    root, faces = dataset
    ranked = make_results(faces, tmp_path / "results.parquet")
    out = tmp_path / "view" / "index.html"
    summary = viewer.write_viewer(str(root), str(tmp_path / "results.parquet"), str(report_dir), str(out),
                                  max_queries=2, top_k=TOP_K)
    page = Page(out.read_text())
    shown = sorted(ranked)[:2]  # deterministic: the first max_queries ids, sorted
    assert [q["id"] for q in page.queries] == shown
    assert summary["queries"] == 2 and summary["missing_faces"] == 0 and summary["path"] == str(out)
    assert summary["bytes"] == out.stat().st_size
    assert summary["faces_embedded"] == len(set(shown) | {f for q in shown for f in ranked[q][:TOP_K]})
    assert len(page.results) == 2 * TOP_K
    for q in page.queries:
        assert q["identity"] == faces[q["id"]]["identity"]
        assert [c["face_id"] for c in q["results"]] == ranked[q["id"]][:TOP_K]
        assert [c["rank"] for c in q["results"]] == list(range(TOP_K))
        for c in q["results"]:
            same = faces[c["face_id"]]["identity"] == faces[q["id"]]["identity"]
            assert c["identity"] == faces[c["face_id"]]["identity"]
            assert c["state"] == ("correct" if same else "incorrect")
        assert [c["state"] for c in q["results"]] == ["incorrect", "correct"] * (TOP_K // 2)
    assert page.marks == ["\u2717", "\u2713"] * (2 * TOP_K // 2)
    # images: queries x (1 + top_k) faces + the report's 2 plots, all inline, crops embedded as stored
    assert len(page.imgs) == summary["images"] == 2 * (1 + TOP_K) + 2
    assert all(img["src"].startswith("data:image/png;base64,") for img in page.imgs)
    first = page.imgs[[i for i, img in enumerate(page.imgs) if img.get("alt") == shown[0]][0]]
    assert base64.b64decode(first["src"].split(",", 1)[1]) == faces[shown[0]]["image"]
    assert "script" not in page.tags and "link" not in page.tags
    text = out.read_text()
    assert "OPQN" in text and "0.6667" in text and "P@10" in text  # metrics header (mAP 2/3 of the report)
    # summary over the shown queries: rank 1 is always wrong, 2 of the top 4 right
    assert "<th>P@1</th><th>P@4</th>" in text and "<td>0.0000</td><td>0.5000</td>" in text


def test_missing_faces_become_placeholders(dataset, tmp_path):
    root, faces = dataset
    q = sorted(f for f, r in faces.items() if r["split"] == "query")[0]
    make_results(faces, tmp_path / "r.parquet", extra={q: ["deleted-face-0", next(iter(faces))],
                                                       "not-in-dataset-q": [q]})
    summary = viewer.write_viewer(str(root), str(tmp_path / "r.parquet"), None, str(tmp_path / "out") + "/",
                                  max_queries=10, top_k=TOP_K)
    assert summary["path"].endswith("/out/index.html") and summary["missing_faces"] == 2
    page = Page(Path(summary["path"]).read_text())
    ghost = [c for c in page.results if c["face_id"] == "deleted-face-0"]
    assert len(ghost) == 1 and ghost[0]["state"] == "unknown" and ghost[0]["identity"] == ""
    assert "missing<br>deleted-face-0" in Path(summary["path"]).read_text()
    unjudged = [x for x in page.queries if x["id"] == "not-in-dataset-q"][0]
    assert unjudged["identity"] == "" and [c["state"] for c in unjudged["results"]] == ["unknown"]


def test_bad_inputs_name_the_input(dataset, report_dir, tmp_path):
    root, faces = dataset
    results = tmp_path / "r.parquet"
    make_results(faces, results)
    out = str(tmp_path / "index.html")
    with pytest.raises(FileNotFoundError, match="query results not found: .*nope.parquet"):
        viewer.write_viewer(str(root), str(tmp_path / "nope.parquet"), None, out)
    pq.write_table(pa.table({"query_id": ["a"], "face_id": ["b"]}), tmp_path / "cols.parquet")
    with pytest.raises(ValueError, match=r"cols.parquet lack columns \['rank', 'score'\]"):
        viewer.write_viewer(str(root), str(tmp_path / "cols.parquet"), None, out)
    (tmp_path / "text.parquet").write_text("not parquet")
    with pytest.raises(ValueError, match="text.parquet are not a Parquet file"):
        viewer.write_viewer(str(root), str(tmp_path / "text.parquet"), None, out)
    pq.write_table(pa.table({"query_id": ["elsewhere"], "rank": pa.array([0], pa.int32()), "face_id": ["x"],
                             "score": pa.array([1.0], pa.float32())}), tmp_path / "other.parquet")
    with pytest.raises(ValueError, match=re.escape(f"face dataset {root} holds none") + " of the 1 query faces"):
        viewer.write_viewer(str(root), str(tmp_path / "other.parquet"), None, out)
    with pytest.raises(FileNotFoundError, match="no-dataset"):
        viewer.write_viewer(str(tmp_path / "no-dataset"), str(results), None, out)
    with pytest.raises(FileNotFoundError, match="report dir .*no-report has no metrics.json"):
        viewer.write_viewer(str(root), str(results), str(tmp_path / "no-report"), out)
    with pytest.raises(ValueError, match="top_k"):
        viewer.write_viewer(str(root), str(results), None, out, top_k=0)
    assert not os.path.exists(out)


def test_results_dataset_gives_the_same_page_as_one_file(dataset, tmp_path):
    """`opqn query` into a folder writes a results dataset (one committed file per query block)."""
    from storage import manifest as mf

    root, faces = dataset
    make_results(faces, tmp_path / "r.parquet")
    table = pq.read_table(tmp_path / "r.parquet")
    folder = str(tmp_path / "results")
    half = table.num_rows // 2
    entries = [mf.write_data_file(folder, part, subdir="blocks") for part in (table.slice(0, half), table.slice(half))]
    mf.commit(folder, mf.Delta(add=tuple(entries)))
    one = viewer.write_viewer(str(root), str(tmp_path / "r.parquet"), None, str(tmp_path / "a.html"), top_k=TOP_K)
    two = viewer.write_viewer(str(root), folder, None, str(tmp_path / "b.html"), top_k=TOP_K)
    assert one["queries"] == two["queries"] > 0 and one["images"] == two["images"]
    assert Page((tmp_path / "a.html").read_text()).results == Page((tmp_path / "b.html").read_text()).results


def test_cli_subcommand(dataset, report_dir, tmp_path, capsys):
    root, faces = dataset
    make_results(faces, tmp_path / "r.parquet")
    parser = argparse.ArgumentParser(prog="opqn")
    view_cli.register(parser.add_subparsers(dest="command"))
    out = tmp_path / "page.html"
    args = parser.parse_args(["view", str(root), str(tmp_path / "r.parquet"), str(out), "--report-dir",
                              str(report_dir), "--max-queries", "1", "--top-k", "2", "--json"])
    assert args.func(args) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["queries"] == 1 and summary["images"] == 1 + 2 + 2 and summary["path"] == str(out)
    page = Page(out.read_text())
    assert len(page.queries) == 1 and len(page.results) == 2


def test_results_and_page_on_s3(dataset, report_dir, s3_bucket, tmp_path):
    from storage import urls

    root, faces = dataset
    make_results(faces, tmp_path / "r.parquet")
    fs, bucket = urls.resolve(s3_bucket)
    fs.put(str(root / "faces"), f"{bucket}/ds/faces", recursive=True)
    fs.put(str(tmp_path / "r.parquet"), f"{bucket}/results.parquet")
    fs.put(str(report_dir), f"{bucket}/report", recursive=True)
    summary = viewer.write_viewer(f"{s3_bucket}/ds", f"{s3_bucket}/results.parquet", f"{s3_bucket}/report",
                                  f"{s3_bucket}/view/index.html", max_queries=3, top_k=TOP_K)
    text = fs.cat_file(f"{bucket}/view/index.html").decode()
    assert summary["bytes"] == len(text.encode()) and len(Page(text).imgs) == 3 * (1 + TOP_K) + 2


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    """Headless Debian Chromium through its chromedriver (infra/install_browser.sh installs both)."""
    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        message = f"{CHROMIUM} or {CHROMEDRIVER} not found: run infra/install_browser.sh"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--no-first-run", "--window-size=1200,1000",
                f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def test_page_renders_the_faces_in_chromium(browser, dataset, report_dir, tmp_path):
    root, faces = dataset
    make_results(faces, tmp_path / "r.parquet")
    out = tmp_path / "index.html"
    summary = viewer.write_viewer(str(root), str(tmp_path / "r.parquet"), str(report_dir), str(out), top_k=TOP_K)
    browser.get(out.as_uri())
    state = browser.execute_script(
        "return Array.from(document.images).map(i => [i.complete, i.naturalWidth, i.alt])")
    assert len(state) == summary["queries"] * (1 + TOP_K) + 2 == 3 * (1 + TOP_K) + 2
    assert all(complete and width > 0 for complete, width, _ in state), [s for s in state if not s[1]]
    assert {w for _, w, alt in state if alt in faces} == {40}  # the stored 40 px crops, decoded
    borders = browser.execute_script(
        "return ['correct', 'incorrect'].map(c => getComputedStyle("
        "document.querySelector('figure.' + c + ' img')).borderTopColor)")
    assert borders == ["rgb(46, 125, 50)", "rgb(198, 40, 40)"]
    shot = tmp_path / "page.png"
    assert browser.save_screenshot(str(shot))
    with Image.open(shot) as im:
        assert im.format == "PNG"
        pixels = np.asarray(im.convert("RGB"))
    assert pixels.shape[0] > 200 and pixels.shape[1] > 200
    assert pixels.std() > 10 and len(np.unique(pixels.reshape(-1, 3), axis=0)) > 500  # faces, not a blank page
