"""``opqn evaluate``: metrics report of one or more checkpoints on a dataset."""
from __future__ import annotations

import argparse
import json
import logging
import sys

from model.registry import METHODS
from model.refine import CODE_SOURCES
from pipelines.evaluate.evaluation import DEFAULT_TS, evaluate_url
from pipelines.evaluate.protocols import PROTOCOLS
from pipelines.progress import format_seconds


def _ts(text: str) -> tuple[int, ...]:
    try:
        ts = tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"--ts must be comma-separated integers, got {text!r}")
    if not ts or min(ts) < 1:
        raise argparse.ArgumentTypeError(f"--ts values must be >= 1, got {text!r}")
    return ts


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "evaluate", help="retrieval metrics (mAP, P@T, PR, float upper bound) of a checkpoint on a dataset, as a report",
        description="Encode the database split with the model's compact codes, query it with the query split, and "
                    "write metrics.json, pr.png, precision_at.png and report.md to REPORT_DIR. DATASET is an "
                    "identity-folder image directory or a face-shard dataset (<dataset>/faces/part-*.parquet). "
                    "Ties are broken by database index ascending. The report also gives the database codes' "
                    "spread (largest code bucket, distinct codes, codewords used, entropy) and warns when one "
                    "code holds more than 2% of a database of >= 300 faces (10% of a smaller one).")
    p.add_argument("model_url", metavar="MODEL_URL", help="checkpoint (path, file:// or s3:// URL); several, "
                   "comma-separated, are evaluated on the same split and drawn on the same plots")
    p.add_argument("dataset", metavar="DATASET", help="identity folder or face-shard dataset")
    p.add_argument("report_dir", metavar="REPORT_DIR", help="folder for metrics.json, plots and report.md")
    p.add_argument("--protocol", choices=PROTOCOLS, default="single",
                   help="single: query split of the trained identities; cross: unseen identities split into "
                        "queries and database (default: single)")
    p.add_argument("--method", choices=sorted(METHODS), default=None,
                   help="expected method of the checkpoint, an error if it holds another (default: any)")
    p.add_argument("--crop-fraction", type=float, default=None, help="folder photos: centre crop (default: the training run's; 1.0 for tight crops such as AT&T)")
    p.add_argument("--min-photos", type=int, default=None, help="folder: identities with at least this many photos (default: training's for single, 2 for cross)")
    p.add_argument("--max-photos", type=int, default=None, help="folder: identities with at most this many photos (default: no limit)")
    p.add_argument("--query-fraction", type=float, default=None, help="single: fraction of each identity's photos as queries (default: training's); cross: used with --queries-per-identity 0")
    p.add_argument("--queries-per-identity", type=int, default=1, help="cross: queries per identity (0: use --query-fraction) (default: 1)")
    p.add_argument("--seed", type=int, default=None, help="split seed (default: training's)")
    p.add_argument("--ts", type=_ts, default=DEFAULT_TS, help="T values for P@T, comma-separated")
    p.add_argument("--codes", choices=CODE_SOURCES, default="model",
                   help="model: the network's own codes; gallery: the codes `opqn encode --codes gallery` writes, a "
                        "quantizer trained on the database's faces (default: model)")
    p.add_argument("--allow-seen", action="store_true", help="cross: allow identities the model was trained on")
    p.add_argument("--threads", type=int, default=2, help="image decoding threads")
    p.add_argument("--json", action="store_true", help="print the metrics (without curves) as one JSON object per "
                   "model on stdout, the human-readable lines on stderr (default: off)")
    p.set_defaults(func=run_evaluate)


def run_evaluate(args) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    out = evaluate_url(args.model_url, args.dataset, args.report_dir, args.protocol, args.method,
                       args.crop_fraction, args.min_photos, args.max_photos, args.query_fraction,
                       args.queries_per_identity, args.seed, args.ts, args.threads, args.allow_seen, args.codes)
    human = sys.stderr if args.json else sys.stdout  # with --json, stdout holds only the JSON object(s)
    for r in out["results"]:
        q, f = r["quantized"], r["float"]
        if args.json:
            print(json.dumps({"model_url": r["model_url"], "method": r["method"], "bits": r["bits"], "codes": r["codes"],
                              "map": q["map"],
                              "precision_at": q["precision_at"], "map_float": f["map"],
                              "precision_at_float": f["precision_at"], "queries": q["queries"], "database": q["database"],
                              "largest_bucket": r["code_spread"]["largest_bucket"],
                              "code_entropy_bits": r["code_spread"]["code_entropy_bits"],
                              "codewords_used_mean": r["code_spread"]["codewords_used_mean"],
                              "warnings": r["warnings"]}))
        p = q["precision_at"]
        print(f"{r['label']} {r['bits']} bit, {args.protocol}-domain, {q['queries']} queries x {q['database']} database: "
              f"mAP {q['map']:.4f}  " + "  ".join(f"P@{t} {p[t]:.4f}" for t in list(p)[:3])
              + f"  (float features mAP {f['map']:.4f}); largest code bucket "
              f"{100 * r['code_spread']['largest_bucket']:.1f}% of the database", file=human)
    print(f"report in {args.report_dir} ({format_seconds(out['context']['seconds'])})", file=human)
    return 0

