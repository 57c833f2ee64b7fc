"""``opqn view DATASET RESULTS OUT``: a static HTML page of query results (mirrors ``write_viewer``)."""
from __future__ import annotations

import json

from pipelines.config_flags import add_json_flag
from pipelines.view.page import write_viewer


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "view", help="write a static HTML page of query results (faces marked correct/incorrect, metrics, plots)",
        description="One self-contained index.html (images embedded, no server or network needed) showing, for the "
                    "first N query ids, the query face and its top-k gallery faces marked by identity, with the "
                    "metrics and plots of an `opqn evaluate` report.")
    p.add_argument("dataset", metavar="DATASET", help="face dataset holding the query and gallery faces")
    p.add_argument("results", metavar="RESULTS", help="query results Parquet written by `opqn query`")
    p.add_argument("out", metavar="OUT", help="HTML file to write (path or s3:// URL; a folder gets index.html)")
    p.add_argument("--report-dir", default=None, help="`opqn evaluate` report dir (metrics.json and PNG plots) (default: none, "
                   "the page shows no metrics)")
    p.add_argument("--max-queries", type=int, default=50, help="queries shown: the first N query ids, sorted")
    p.add_argument("--top-k", type=int, default=10, help="results shown per query")
    add_json_flag(p)
    p.set_defaults(func=run_view)


def run_view(args) -> int:
    summary = write_viewer(args.dataset, args.results, args.report_dir, args.out, max_queries=args.max_queries,
                           top_k=args.top_k)
    print(json.dumps(summary) if args.json else
          f"viewer of {summary['queries']} queries ({summary['missing_faces']} faces missing) written to "
          f"{summary['path']}")
    return 0
