"""The `opqn view` page: one static HTML page to look at query results by eye.

Metrics say how good retrieval is; this page shows *which* faces came back. Per query (the
first ``max_queries`` query ids, sorted, so two runs show the same queries) it shows the
query face and its top-k gallery faces, each marked correct (same identity, green check) or
incorrect (red cross), under a header with the evaluation report's metrics and plots.

The page is one self-contained file: the stored crops (already PNG/JPEG bytes) and the
report's PNG plots are embedded as-is as ``data:`` URIs, with inline CSS and no script, so
it opens from local disk or S3 on any machine without a server or network access.

Face shards are streamed: per shard only the ``face_id`` column is read in full, then only
the row groups holding a needed face are read with their image bytes, so a large gallery is
never held in memory.
"""
from __future__ import annotations

import base64
import html
import json
import os

RESULT_COLUMNS = ("query_id", "rank", "face_id", "score")
SUMMARY_KS = (1, 5, 10)

# Magic prefixes of the encodings a crop may be stored in; browsers sniff anything else.
_MIME = ((b"\x89PNG\r\n\x1a\n", "image/png"), (b"\xff\xd8\xff", "image/jpeg"), (b"GIF8", "image/gif"),
         (b"BM", "image/bmp"))

CSS = """
body{font-family:system-ui,sans-serif;margin:16px;color:#222;background:#fafafa}
h1{font-size:20px;margin:0 0 8px} h2{font-size:16px;margin:16px 0 6px}
table{border-collapse:collapse;margin:6px 0} td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}
th:first-child,td:first-child{text-align:left}
.sources{font-size:12px;color:#555} .plots img{max-width:360px;margin:4px 8px 4px 0;border:1px solid #ddd}
.query{display:flex;gap:14px;align-items:flex-start;padding:10px 0;border-top:1px solid #ddd}
.results{display:flex;flex-wrap:wrap;gap:6px}
figure{margin:0;width:104px;font-size:11px;text-align:center;overflow-wrap:anywhere}
figure img,.missing{width:96px;height:96px;object-fit:cover;display:block;margin:0 auto;border:4px solid #888}
.missing{display:flex;align-items:center;justify-content:center;background:#eee;font-size:10px;width:88px;height:88px}
.query-face img,.query-face .missing{border-color:#1565c0}
.correct img,.correct .missing{border-color:#2e7d32} .incorrect img,.incorrect .missing{border-color:#c62828}
.mark{font-weight:bold;font-size:14px} .correct .mark{color:#2e7d32} .incorrect .mark{color:#c62828}
.unknown .mark{color:#888}
"""

MARKS = {"correct": "\u2713", "incorrect": "\u2717", "unknown": "?"}


def write_viewer(dataset: str, results: str, report_dir: str | None, out: str, *, max_queries: int = 50,
                 top_k: int = 10, storage_options: dict | None = None) -> dict:
    """Write the results page to ``out`` (atomically) and return a summary.

    ``out`` is the HTML file's URL; a URL ending in ``/`` or an existing local directory gets
    ``index.html`` inside it. Returns ``{"path", "queries", "faces_embedded", "missing_faces",
    "images", "bytes"}``.
    """
    from storage import urls
    from storage.files import write_bytes_atomic

    if max_queries < 1 or top_k < 1:
        raise ValueError(f"max_queries and top_k must be >= 1, got {max_queries} and {top_k}")
    ranked = read_results(results, max_queries, top_k, storage_options)
    needed = set(ranked) | {face for rows in ranked.values() for face, _, _ in rows}
    faces = read_faces(dataset, needed, storage_options)
    if not any(q in faces for q in ranked):
        raise ValueError(f"face dataset {dataset} holds none of the {len(ranked)} query faces shown from {results} "
                         f"(e.g. {sorted(ranked)[:3]}); pass the dataset the queries and gallery came from")
    report = read_report(report_dir, storage_options) if report_dir else None
    page, images = render(ranked, faces, report, {"dataset": dataset, "results": results, "report": report_dir},
                          top_k)
    if out.endswith("/") or (urls.is_local(out) and os.path.isdir(urls.local_path(out))):
        out = urls.join(out, "index.html")
    data = page.encode("utf-8")
    write_bytes_atomic(out, data, storage_options)
    return {"path": out, "queries": len(ranked), "faces_embedded": len(faces),
            "missing_faces": len(needed - set(faces)), "images": images, "bytes": len(data)}


def read_results(results: str, max_queries: int, top_k: int, storage_options: dict | None = None) -> dict:
    """``{query_id: [(face_id, rank, score), ...]}`` for the first ``max_queries`` query ids
    (sorted) and their ranks below ``top_k``, best first, from a results file or dataset. Two
    streaming passes (ids, then the chosen rows), so results of many queries are never loaded whole."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from pipelines.query.results import is_single_file, result_files
    from storage import files
    from storage.tables import iter_batches, read_schema

    if is_single_file(results) and not files.exists(results, storage_options):
        raise FileNotFoundError(f"query results not found: {results} (write them with `opqn query`)")
    parts = result_files(results, storage_options)
    for part in parts:
        try:
            schema = read_schema(part, storage_options)
        except pa.ArrowInvalid as exc:
            raise ValueError(f"query results {part} are not a Parquet file: {exc}") from exc
        missing = [c for c in RESULT_COLUMNS if c not in schema.names]
        if missing:
            raise ValueError(f"query results {part} lack columns {missing}: expected {list(RESULT_COLUMNS)} "
                             f"as written by `opqn query`, found {schema.names}")
    ids: set = set()
    for part in parts:
        for batch in iter_batches(part, ["query_id"], storage_options=storage_options):
            ids.update(pc.unique(batch.column(0)).to_pylist())
    ids.discard(None)
    if not ids:
        raise ValueError(f"query results {results} hold no queries")
    chosen = sorted(ids)[:max_queries]
    wanted = pa.array(chosen, pa.string())
    ranked: dict = {q: [] for q in chosen}
    for part in parts:
        for batch in iter_batches(part, list(RESULT_COLUMNS), storage_options=storage_options):
            keep = pc.and_(pc.is_in(batch.column("query_id"), value_set=wanted), pc.less(batch.column("rank"), top_k))
            keep = pc.and_(keep, pc.is_valid(batch.column("face_id")))
            for row in batch.filter(keep).to_pylist():
                ranked[row["query_id"]].append((row["face_id"], int(row["rank"]), row["score"]))
    for rows in ranked.values():
        rows.sort(key=lambda r: r[1])
    return ranked


def read_faces(dataset: str, needed: set, storage_options: dict | None = None) -> dict:
    """``{face_id: (identity, image bytes)}`` for the needed faces found in the dataset.

    Per shard: the face_id column, then only the row groups that hold a needed face (with
    their image bytes); stops as soon as every needed face is found."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from pipelines.formats.faces import face_shard_files
    from storage.tables import open_parquet

    found: dict = {}
    wanted = pa.array(sorted(needed), pa.string())
    for url in face_shard_files(dataset, storage_options):
        if len(found) == len(needed):
            break
        with open_parquet(url, storage_options) as pf:
            ids = pf.read(columns=["face_id"]).column("face_id")
            start = 0
            for g in range(pf.num_row_groups):
                n = pf.metadata.row_group(g).num_rows
                hit = pc.is_in(ids.slice(start, n), value_set=wanted)
                start += n
                if not pc.any(hit).as_py():
                    continue
                group = pf.read_row_group(g, columns=["face_id", "identity", "image"])
                for row in group.filter(hit).to_pylist():
                    found.setdefault(row["face_id"], (row["identity"], row["image"]))
    return found


def read_report(report_dir: str, storage_options: dict | None = None) -> dict:
    """``{"metrics": metrics.json's content, "plots": [(name, png bytes), ...]}`` of an
    `opqn evaluate` report directory."""
    from storage import urls
    from storage.files import read_all

    metrics_url = urls.join(report_dir, "metrics.json")
    try:
        metrics = json.loads(read_all(metrics_url, storage_options))
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"report dir {report_dir} has no metrics.json (write it with `opqn evaluate`)") from exc
    except json.JSONDecodeError as exc:
        raise ValueError(f"{metrics_url} is not valid JSON: {exc}") from exc
    if not isinstance(metrics, dict) or not isinstance(metrics.get("results"), list):
        raise ValueError(f"{metrics_url} has no 'results' list (expected an `opqn evaluate` report)")
    fs, root = urls.resolve(report_dir, storage_options)
    plots = [(p.rsplit("/", 1)[-1], read_all(urls.join(report_dir, p.rsplit("/", 1)[-1]), storage_options))
             for p in sorted(fs.glob(root.rstrip("/") + "/*.png"))]
    return {"metrics": metrics, "plots": plots}


def data_uri(data: bytes) -> str:
    mime = next((m for magic, m in _MIME if data.startswith(magic)), "application/octet-stream")
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        mime = "image/webp"
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def _esc(value) -> str:
    return html.escape(str(value), quote=True)


def _face(classes: str, face_id: str, faces: dict, caption: str, attrs: str = "") -> str:
    """A figure with the face's image, or a placeholder naming the id when it is not in the dataset."""
    if face_id in faces:
        identity, data = faces[face_id]
        body = f'<img src="{data_uri(data)}" alt="{_esc(face_id)}" title="{_esc(face_id)}">'
    else:
        identity = None
        body = f'<div class="missing" title="not in the dataset">missing<br>{_esc(face_id)}</div>'
    return (f'<figure class="{classes}" data-face-id="{_esc(face_id)}" data-identity="{_esc(identity or "")}"{attrs}>'
            f'{body}<figcaption>{caption}{_esc(identity if identity is not None else "unknown identity")}'
            f'</figcaption></figure>')


def _metrics_html(report: dict) -> list[str]:
    metrics = report["metrics"]
    context = metrics.get("context") or {}
    out = ["<section class=\"metrics\"><h2>Metrics" + (f": {_esc(context['title'])}" if context.get("title") else "")
           + "</h2>"]
    facts = [f"{k}: {_esc(context[k])}" for k in ("dataset", "protocol", "split") if context.get(k)]
    if facts:
        out.append(f'<p class="sources">{"<br>".join(facts)}</p>')
    results = metrics["results"]
    ts = sorted({int(t) for r in results for t in (r.get("quantized") or {}).get("precision_at", {})})
    head = ["method", "bits", "mAP"] + [f"P@{t}" for t in ts] + ["float mAP", "queries", "database"]
    out.append("<table><tr>" + "".join(f"<th>{_esc(h)}</th>" for h in head) + "</tr>")
    for r in results:
        q, f = r.get("quantized") or {}, r.get("float") or {}
        pat = q.get("precision_at", {})
        cells = [r.get("label", r.get("method", "")), r.get("bits", ""), _num(q.get("map"))]
        cells += [_num(pat.get(str(t), pat.get(t))) for t in ts]
        cells += [_num(f.get("map")), q.get("queries", ""), q.get("database", "")]
        out.append("<tr>" + "".join(f"<td>{_esc(c)}</td>" for c in cells) + "</tr>")
    out.append("</table>")
    if report["plots"]:
        out.append('<div class="plots">' + "".join(
            f'<img class="plot" src="{data_uri(data)}" alt="{_esc(name)}" title="{_esc(name)}">'
            for name, data in report["plots"]) + "</div>")
    out.append("</section>")
    return out


def _num(v) -> str:
    return "" if v is None else f"{float(v):.4f}"


def render(ranked: dict, faces: dict, report: dict | None, sources: dict, top_k: int) -> tuple[str, int]:
    """The page's HTML and the number of <img> elements in it."""
    ks = sorted({k for k in (*SUMMARY_KS, top_k) if k <= top_k})
    hits = {k: [] for k in ks}
    blocks = []
    for qid, rows in ranked.items():
        q_identity = faces[qid][0] if qid in faces else None
        cells = []
        correct = []
        for face_id, rank, score in rows:
            identity = faces[face_id][0] if face_id in faces else None
            state = "unknown" if q_identity is None or identity is None else (
                "correct" if identity == q_identity else "incorrect")
            correct.append(state == "correct")
            caption = (f'<span class="mark">{MARKS[state]}</span> #{rank + 1} '
                       f'<span class="score">{_num(score)}</span><br>')
            cells.append(_face(f"result {state}", face_id, faces, caption, f' data-rank="{rank}"'))
        if q_identity is not None:  # a query without a known identity cannot be judged
            for k in ks:
                hits[k].append(sum(correct[:k]) / k)
        blocks.append(f'<section class="query" data-query-id="{_esc(qid)}">'
                      + _face("query-face", qid, faces, "query<br>") + '<div class="results">' + "".join(cells)
                      + "</div></section>")
    judged = len(hits[ks[0]])
    summary = ("<table><tr><th>over shown queries</th>" + "".join(f"<th>P@{k}</th>" for k in ks) + "</tr><tr><td>"
               + f"{judged} of {len(ranked)} queries</td>"
               + "".join(f"<td>{_num(sum(v) / len(v)) if v else ''}</td>" for k, v in hits.items()) + "</tr></table>")
    src = "<br>".join(f"{k}: {_esc(v)}" for k, v in sources.items() if v)
    parts = ["<!doctype html>", '<html lang="en"><head><meta charset="utf-8">',
             "<title>OPQN query results</title>", f"<style>{CSS}</style></head><body>",
             "<h1>OPQN query results</h1>", f'<p class="sources">{src}</p>']
    if report:
        parts += _metrics_html(report)
    parts += ['<section class="summary"><h2>Precision@k of the queries shown</h2>', summary,
              f'<p class="sources">First {len(ranked)} query ids (sorted), top {top_k} results each; '
              "#1 is the best. Green \u2713: same identity as the query; red \u2717: another identity; "
              "grey ?: identity unknown (face not in the dataset), counted as not correct. "
              "P@k divides by k.</p></section>"]
    parts += blocks
    parts.append("</body></html>")
    page = "\n".join(parts) + "\n"
    return page, page.count("<img ")
