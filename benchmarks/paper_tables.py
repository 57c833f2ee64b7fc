"""Analogues of the OPQN paper's Tables I, III and IV on CPU-sized data and budget.

Every method is trained by the same loop (``pipelines.train.local.train_method``) on the
same backbone (ResNet20 at ``--width``, ``--image-size`` px), data and epochs.

- Table I (single-domain): LFW identities with >= 10 photos, 20% of each identity's photos
  as queries, the rest training set and database; mAP at each code length, every method.
- Table III (cross-domain): the Table I models evaluated on identities they never saw:
  LFW identities with 2-4 photos (one query each, the rest database) and AT&T faces
  (40 identities, ``--att-queries`` queries each, tight crops); P@5 and mAP.
- Table IV (ablations): OPQN against OPQN-A, -C, -S, -W at the ablation code lengths.

Code lengths use K = 256 codewords and square codebooks (D = M * K): 16 = 2x256,
24 = 3x256, 32 = 4x256, 48 = 6x256; DCDH uses the same D and ``bits`` hash bits.
``--seeds`` repeats each model with other training seeds (initialisation, batch order,
augmentation; the query split stays the same); tables then show mean ± standard deviation over
the seeds that have results, plots the first seed. Checkpoints go to ``--work`` and are reused when the run is repeated with the same settings,
so an interrupted run resumes; results are written to ``--json`` after every model (one results
file per setting; ``--merge`` folds the files of parallel runs of the same setting in), plots
(PR and P@T, several methods per plot) to ``--img``. The last stdout lines are markdown tables.

    nice -n 10 .venv/bin/python benchmarks/paper_tables.py --tables 1,3 --methods opqn,l2q,dpq,dcdh \
        --bits 16,32 --epochs 10
    nice -n 10 .venv/bin/python benchmarks/paper_tables.py --tables 4 --ablation-bits 16,32 --epochs 10
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path


from model.registry import METHODS, get_method
from pipelines.evaluate.evaluation import DEFAULT_TS, evaluate_model
from pipelines.evaluate.protocols import load_split
from pipelines.evaluate.report import plot_pr, plot_precision_at
from pipelines.formats.checkpoint import checkpoint_exists, load_checkpoint, model_from_checkpoint
from pipelines.progress import format_seconds
from pipelines.settings import data_root
from pipelines.train.local import TrainConfig, prepare_sets, train_method

ABLATIONS = ("opqn", "A", "C", "S", "W")


def _seed_tag(seed: int, sep: str) -> str:
    """Seed 0 keeps the names of runs made before seeds existed, so their checkpoints are reused."""
    return f"{sep}{seed}" if seed else ""


def _round(metrics: dict, pr: bool) -> dict:
    out = {"map": round(metrics["map"], 4),
           "precision_at": {int(t): round(v, 4) for t, v in metrics["precision_at"].items()},
           "queries": metrics["queries"], "database": metrics["database"]}
    return {**out, "pr": metrics["pr"]} if pr else out


def _row(result: dict, info: dict, pr: bool = True) -> dict:
    """A run's results; ``pr=False`` drops the PR curve, which only the plotted (seed-0) runs need."""
    return {"method": result["method"], "label": result["label"], "bits": result["bits"], "ranking": result["ranking"],
            "quantized": _round(result["quantized"], pr), "float": _round(result["float"], pr),
            "distinct_database_codes": result["distinct_database_codes"], **info}


def _save(path: Path, store: dict) -> None:
    """Compact JSON: indented, the PR curves' long lists made the file megabytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(store))


def _seed_runs(runs: dict, method: str, bits: int) -> list[dict]:
    """Every seed's run of (method, bits): the seed-0 key and its ``:s<seed>`` siblings."""
    return [run for key, run in runs.items() if key == f"{method}:{bits}" or key.startswith(f"{method}:{bits}:s")]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tables", default="1,3,4", help="which tables: 1, 3, 4")
    ap.add_argument("--methods", default="opqn,l2q,dpq,dcdh", help=f"Table I/III methods, from {sorted(METHODS)}")
    ap.add_argument("--bits", default="16,24,32,48", help="Table I/III code lengths")
    ap.add_argument("--ablation-bits", default="16,32", help="Table IV code lengths")
    ap.add_argument("--ablations", default=",".join(ABLATIONS), help="Table IV methods")
    ap.add_argument("--seeds", default="0", help="training seeds; each model is trained once per seed")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--width", type=float, default=0.25)
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--att-queries", type=int, default=2, help="AT&T queries per identity")
    ap.add_argument("--work", default="runs/paper_tables", help="checkpoint folder (reused on re-runs)")
    ap.add_argument("--json", default="docs/img/paper_tables.json", help="results file (merged with an existing one)")
    ap.add_argument("--img", default="docs/img", help="folder for the plots")
    ap.add_argument("--merge", default="", help="comma-separated results files of other runs to merge into --json")
    ap.add_argument("--render-only", action="store_true", help="no training or evaluation: tables and plots from --json")
    args = ap.parse_args(argv)
    t_start = time.monotonic()
    tables = {t.strip() for t in args.tables.split(",") if t.strip()}
    methods = [get_method(m).name for m in args.methods.split(",") if m]
    bits_list = [int(b) for b in args.bits.split(",") if b]
    abl_bits = [int(b) for b in args.ablation_bits.split(",") if b]
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    ablations = [get_method(m).name for m in args.ablations.split(",") if m]

    # the paper's recipe (step halvings, crop/flip only, no balance term, 0.5 crop), so the tables
    # test the paper's claims under its own training and stay comparable with docs/results.md
    base = TrainConfig(epochs=args.epochs, width=args.width, image_size=args.image_size, batch_size=args.batch_size,
                       threads=args.threads, min_photos=10, query_fraction=0.2, codewords=256, dim=0, resume=False,
                       schedule="step", augment="crop,flip", balance=0.0, crop_fraction=0.5)
    cross_names = ["LFW unseen (2-4 photos)", "AT&T faces"] if "3" in tables else []
    cross_sets = {}
    if not args.render_only:
        train_set, query_set = prepare_sets(base)
        print(f"LFW >= 10 photos: {len(train_set)} training/database faces, {len(query_set)} queries, "
              f"{len(set(train_set.labels))} identities", file=sys.stderr)
    if cross_names and not args.render_only:
        cross_sets[cross_names[0]] = load_split(str(data_root() / "lfw"), "cross", base.stored_size(),
                                                base.crop_fraction, min_photos=2, max_photos=4)
        cross_sets[cross_names[1]] = load_split(str(data_root() / "att_faces"), "cross", base.stored_size(), 1.0,
                                                min_photos=2, queries_per_identity=args.att_queries)
        for name, s in cross_sets.items():
            print(f"{name}: {len(s.queries)} queries x {len(s.database)} database, {s.description}", file=sys.stderr)

    jobs = []  # (method, bits, seed)
    for seed in seeds:
        if tables & {"1", "3"}:
            jobs += [(m, b, seed) for b in bits_list for m in methods]
        if "4" in tables:
            jobs += [(m, b, seed) for b in abl_bits for m in ablations if (m, b, seed) not in jobs]

    path = Path(args.json)
    store = json.loads(path.read_text()) if path.exists() else {}
    store.setdefault("runs", {})
    for other in (p for p in args.merge.split(",") if p):
        extra = json.loads(Path(other).read_text())
        if extra.get("setting") and store.get("setting") and extra["setting"] != store["setting"]:
            raise SystemExit(f"{other} holds results of another setting ({extra['setting']} vs {store['setting']})")
        for key, run in extra.get("runs", {}).items():
            store["runs"][key] = {**store["runs"].get(key, {}), **run}
        store.setdefault("commands", [])
        store["commands"] += [c for c in extra.get("commands", []) if c not in store["commands"]]
    if args.render_only:
        jobs = []
    setting = {"epochs": args.epochs, "width": args.width, "image_size": args.image_size,
               "batch_size": args.batch_size, "codewords": 256, "dim": "M*K"}
    if args.render_only:
        setting = store.get("setting", setting)
    elif store.get("setting") and store["setting"] != setting:
        raise SystemExit(f"{path} holds results of another setting ({store['setting']}); use another --json")
    store["setting"] = setting
    store.setdefault("commands", [])
    cmd = "nice -n 10 .venv/bin/python benchmarks/paper_tables.py " + " ".join(argv if argv is not None else sys.argv[1:])
    if cmd not in store["commands"] and not args.render_only:
        store["commands"].append(cmd)

    for method, bits, seed in jobs:
        cfg = replace(base, bits=bits, seed=seed,
                      model_url=os.path.join(args.work, f"{method}-{bits}bit-e{args.epochs}-w{args.width}{_seed_tag(seed, '-s')}.pt"))
        t0 = time.monotonic()
        state = load_checkpoint(cfg.model_url) if checkpoint_exists(cfg.model_url) else None
        if state is not None and state.get("train") == asdict(cfg) and state.get("epoch") == args.epochs:
            model = model_from_checkpoint(state)
            info = {"train_seconds": state.get("train_seconds"), "final_loss": state["history"][-1]["loss"], "reused_checkpoint": True}
        else:
            model, tinfo = train_method(method, cfg, train_set)
            info = {"train_seconds": round(tinfo["train_seconds"], 1), "final_loss": round(tinfo["history"][-1]["loss"], 4)}
        run = {"single": _row(evaluate_model(model, query_set, train_set, DEFAULT_TS), info, pr=not seed)}
        for name, s in cross_sets.items():
            run[name] = _row(evaluate_model(model, s.queries, s.database, DEFAULT_TS), {}, pr=not seed)
        key = f"{method}:{bits}{_seed_tag(seed, ':s')}"
        store["runs"][key] = {**store["runs"].get(key, {}), "setting": setting, **run}
        _save(path, store)
        r = run["single"]
        print(f"{r['label']} {bits} bit seed {seed}: single mAP {r['quantized']['map']:.4f} P@5 {r['quantized']['precision_at'][5]:.4f} "
              f"float mAP {r['float']['map']:.4f}"
              + "".join(f"; {n}: mAP {run[n]['quantized']['map']:.4f} P@5 {run[n]['quantized']['precision_at'][5]:.4f}"
                        for n in cross_sets)
              + f" ({format_seconds(time.monotonic() - t0)})", flush=True)

    runs = store["runs"]

    def p5(metrics):
        return metrics["precision_at"].get(5, metrics["precision_at"].get("5"))

    def get(m, b, where="single"):
        return runs.get(f"{m}:{b}", {}).get(where)

    def cell(m, b, value, where="single", digits=4):
        """One table cell: the value of the seed-0 run, or mean ± std over every seed run."""
        rows = [run[where] for run in _seed_runs(runs, m, b) if where in run]
        if not rows:
            return ""
        vals = [value(r) for r in rows]
        if len(vals) == 1:
            return f"{vals[0]:.{digits}f}"
        return f"{statistics.mean(vals):.3f} ± {statistics.stdev(vals):.3f}"

    if args.merge:
        _save(path, store)

    def sizes(where="single"):
        row = next((r[where] for r in runs.values() if where in r), None)
        return (row["quantized"]["queries"], row["quantized"]["database"]) if row else (0, 0)

    img = Path(args.img)
    img.mkdir(parents=True, exist_ok=True)
    out = []
    if "1" in tables:
        out += ["", "Table I analogue: single-domain mAP, LFW >= 10 photos ({} queries x {} database)".format(*sizes()), "",
                "| method | " + " | ".join(f"{b} bit" for b in bits_list) + " | float mAP (" + ", ".join(map(str, bits_list)) + ") |",
                "|---|" + "---|" * (len(bits_list) + 1)]
        for m in methods:
            cells = [cell(m, b, lambda r: r["quantized"]["map"]) for b in bits_list]
            fl = ", ".join(cell(m, b, lambda r: r["float"]["map"], digits=3) or "-" for b in bits_list)
            out.append(f"| {METHODS[m].label} | " + " | ".join(cells) + f" | {fl} |")
        for b in bits_list:
            rows = [get(m, b) for m in methods if get(m, b)]
            if rows:
                plot_pr(rows, img / f"table1_{b}bit_pr.png", f"LFW single-domain, {b} bit", include_float=False)
                plot_precision_at(rows, img / f"table1_{b}bit_precision_at.png", f"LFW single-domain, {b} bit", include_float=False)
    if "3" in tables:
        for name in cross_names:
            nq, nd = sizes(name)
            out += ["", f"Table III analogue: cross-domain, trained on LFW >= 10 photos, evaluated on {name} "
                    f"({nq} queries x {nd} database)", "",
                    "| method | " + " | ".join(f"{b} bit P@5 / mAP" for b in bits_list) + " | float P@5 / mAP (" + ", ".join(map(str, bits_list)) + ") |",
                    "|---|" + "---|" * (len(bits_list) + 1)]
            for m in methods:
                cells = [cell(m, b, lambda r: p5(r["quantized"]), name) + " / " + cell(m, b, lambda r: r["quantized"]["map"], name)
                         if get(m, b, name) else "" for b in bits_list]
                fl = ", ".join(cell(m, b, lambda r: p5(r["float"]), name, 3) + " / " + cell(m, b, lambda r: r["float"]["map"], name, 3)
                               if get(m, b, name) else "-" for b in bits_list)
                out.append(f"| {METHODS[m].label} | " + " | ".join(cells) + f" | {fl} |")
            tag = "lfw_unseen" if name.startswith("LFW") else "att"
            for b in bits_list:
                rows = [get(m, b, name) for m in methods if get(m, b, name)]
                if rows:
                    plot_precision_at(rows, img / f"table3_{tag}_{b}bit_precision_at.png", f"{name}, {b} bit", include_float=False)
    if "4" in tables:
        out += ["", "Table IV analogue: ablations, single-domain mAP on LFW >= 10 photos", "",
                "| variant | " + " | ".join(f"{b} bit" for b in abl_bits) + " |", "|---|" + "---|" * len(abl_bits)]
        for m in ablations:
            out.append(f"| {METHODS[m].label} | " + " | ".join(cell(m, b, lambda r: r["quantized"]["map"]) for b in abl_bits) + " |")
    counts = sorted({len(_seed_runs(runs, *key.split(":")[:2])) for key in runs})
    if counts and counts != [1]:
        out += ["", f"cells with several seeds: mean ± sample standard deviation over {'/'.join(map(str, counts))} seeds"]
    out += ["", f"total {format_seconds(time.monotonic() - t_start)}; setting: {json.dumps(setting)}"]
    print("\n".join(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
