"""Evaluation reports: ``metrics.json``, PR and P@T plots (PNG, several methods on one plot)
and a markdown summary. Plots use matplotlib's Agg backend (no display needed)."""
from __future__ import annotations

import io
import json
import os

TIE_RULE = ("Ranking: score descending; ties (common with compact codes: identical codes score the "
            "same) are broken by database index ascending, i.e. a stable sort (model/metrics.py).")


def _curve_sets(results: list[dict], include_float: bool) -> list[tuple[str, dict, str]]:
    """(label, metrics, line style) per curve: each method, plus its float bound if asked."""
    curves = []
    for r in results:
        curves.append((r["label"], r["quantized"], "-"))
        if include_float and "float" in r:
            curves.append((f"{r['label']} float (upper bound)", r["float"], "--"))
    return curves


def plot_pr(results: list[dict], path: str | os.PathLike, title: str = "", include_float: bool = True) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4), dpi=120)
    for label, m, style in _curve_sets(results, include_float):
        ax.plot(m["pr"]["recall"], m["pr"]["precision"], style, label=label, linewidth=1.4)
    ax.set_xlabel("Recall")
    ax.set_ylabel("Precision")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.set_title(title or "Precision-recall")
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_precision_at(results: list[dict], path: str | os.PathLike, title: str = "", include_float: bool = True) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4), dpi=120)
    for label, m, style in _curve_sets(results, include_float):
        ts = sorted(int(t) for t in m["precision_at"])
        ax.plot(ts, [m["precision_at"][t] if t in m["precision_at"] else m["precision_at"][str(t)] for t in ts],
                style, marker="o", markersize=3, label=label, linewidth=1.4)
    ax.set_xscale("log")
    ax.set_xlabel("Number of top returned images T")
    ax.set_ylabel("Precision@T")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3, which="both")
    ax.set_title(title or "Precision at T")
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _p(m: dict, t: int):
    v = m["precision_at"].get(t, m["precision_at"].get(str(t)))
    return "" if v is None else f"{v:.4f}"


def markdown(results: list[dict], context: dict, images: dict[str, str]) -> str:
    ts = sorted({int(t) for r in results for t in r["quantized"]["precision_at"]})
    lines = [f"# Retrieval evaluation: {context.get('title', '')}".rstrip(": "), ""]
    for k in ("model_url", "model_id", "dataset", "protocol", "split", "database_order"):
        if context.get(k):
            lines.append(f"- {k.replace('_', ' ')}: `{context[k]}`")
    first = results[0]["quantized"]
    lines += [f"- queries x database: {first['queries']} x {first['database']}"
              + (f" ({first['excluded_queries']} queries without a relevant item excluded)" if first.get("excluded_queries") else ""),
              f"- {TIE_RULE}",
              "- mAP is over the full ranking of the whole database; P@T is the mean precision in the top T "
              "(T larger than the database counts the whole database).",
              "- float: cosine of the same model's unquantized D-dim feature, the upper bound of its codes.", ""]
    head = ["method", "bits", "mAP"] + [f"P@{t}" for t in ts] + ["float mAP", "float P@5"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        q, f = r["quantized"], r.get("float")
        row = [r["label"], str(r.get("bits", "")), f"{q['map']:.4f}"] + [_p(q, t) for t in ts]
        row += [f"{f['map']:.4f}" if f else "", _p(f, 5) if f else ""]
        lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    lines += spread_lines(results)
    for r in results:
        if r.get("ranking"):
            lines.append(f"- {r['label']}: {r['ranking']}")
    lines.append("")
    for name, file in images.items():
        lines.append(f"![{name}]({file})")
    return "\n".join(lines) + "\n"


def spread_lines(results: list[dict]) -> list[str]:
    """The code-spread table (database codes, ``model.code_spread``) and any sink-code warnings,
    for results that carry them."""
    rows = [r for r in results if r.get("code_spread")]
    if not rows:
        return []
    lines = ["## Code spread (database codes)", "",
             "One code holding many faces (a sink) makes them indistinguishable to codes-only retrieval.", "",
             "| method | largest bucket | faces in it | distinct codes | codewords used per subspace | "
             "code entropy (bits) | subspace entropy (bits, mean) |", "|" + "---|" * 7]
    for r in rows:
        sp = r["code_spread"]
        lines.append(f"| {r['label']} | {100 * sp['largest_bucket']:.1f}% of {sp['rows']} | "
                     f"{sp['largest_bucket_rows']} | {sp['distinct_codes']} | "
                     f"{', '.join(map(str, sp['codewords_used']))} of {sp['K']} (mean {sp['codewords_used_mean']:.1f}) | "
                     f"{sp['code_entropy_bits']:.2f} | {sp['subspace_entropy_bits_mean']:.2f} |")
    lines.append("")
    for r in rows:
        lines += [f"**{r['label']}: {w}**" for w in r.get("warnings", [])] + [""] * bool(r.get("warnings"))
    return lines


def _png(plot) -> bytes:
    buf = io.BytesIO()
    plot(buf)
    return buf.getvalue()


def write_report(report_dir: str | os.PathLike, results: list[dict], context: dict | None = None,
                 include_float: bool = True) -> dict[str, str]:
    """Write metrics.json, pr.png, precision_at.png and report.md to a folder URL (path or s3://);
    returns their URLs. Each file is written atomically."""
    from storage import files, urls

    if not results:
        raise ValueError("no results to report")
    context = dict(context or {})
    out = str(report_dir)
    title = context.get("title", "")
    paths = {"metrics": urls.join(out, "metrics.json"), "pr": urls.join(out, "pr.png"),
             "precision_at": urls.join(out, "precision_at.png"), "report": urls.join(out, "report.md")}
    payload = {"context": context, "tie_rule": TIE_RULE, "results": results}
    contents = {
        "metrics": json.dumps(payload, indent=1, default=float).encode(),
        "pr": _png(lambda path: plot_pr(results, path, f"Precision-recall {title}".strip(), include_float)),
        "precision_at": _png(lambda path: plot_precision_at(results, path, f"Precision@T {title}".strip(),
                                                            include_float)),
        "report": markdown(results, context, {"PR curve": "pr.png", "P@T": "precision_at.png"}).encode(),
    }
    for key, data in contents.items():
        files.write_bytes_atomic(paths[key], data)
    return paths


def read_report_markdown(report_dir: str, storage_options: dict | None = None) -> str:
    """report.md of a report folder written by ``write_report`` (for Prefect's artifacts)."""
    from storage import files, urls

    return files.read_all(urls.join(report_dir, "report.md"), storage_options).decode()
