"""``opqn query MODEL_URL GALLERY QUERIES RESULTS``: batch retrieval (mirrors ``query_batch``)."""
from __future__ import annotations

import json
import logging

from pipelines.config_flags import add_config_arguments, add_json_flag, config_from_args
from pipelines.query.run import MAX_TOP_K, QueryConfig


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "query", help="rank a gallery of codes for a batch of query faces (Ray tasks per shard group, top-k merge)",
        description="Every query face becomes an M x K table (the model's soft assignments); every gallery code "
                    "is scored exactly (sum of M table entries) in Ray tasks over groups of code shards, and the "
                    "per-task top-k are merged. Queries are read, embedded and scored in blocks (--query-block, or "
                    "as many as --memory-mb holds), so any number of queries fits in memory. RESULTS ending in "
                    ".parquet is one Parquet file, written when the job ends; any other RESULTS is a results "
                    "dataset folder (manifest.json + one Parquet file per query block, each committed when its "
                    "block is done): a killed job run again resumes at its first uncommitted block, and a re-run "
                    "with nothing new does nothing. Rows: query_id, rank (0 = best), face_id, "
                    "score, ordered per query by score desc, then gallery position (shard in manifest order, "
                    f"row). Tombstoned faces never appear. --top-k (and --rerank/--refine R) at most {MAX_TOP_K}. "
                    "RAY_ADDRESS runs the tasks on a cluster. "
                    "--rerank R (R >= --top-k; a gallery encoded with --store-features) keeps the PQ top-R and "
                    "returns the top-k of those re-scored by the exact cosine of the float features (score = "
                    "that cosine; ties by gallery position). --refine R does the same with the gallery's compact "
                    "refine codes (a gallery encoded with --refine-bytes B; score = the inner product of the "
                    "normalised query feature with the decoded refine vector); --rerank and --refine are "
                    "alternatives.")
    p.add_argument("model_url", metavar="MODEL_URL", help="checkpoint that encoded the gallery (path, file://, s3://)")
    p.add_argument("gallery", metavar="GALLERY", help="gallery URL (code shards + manifest.json)")
    p.add_argument("queries", metavar="QUERIES",
                   help="face-shard dataset URL (rows of --split) or a local identity/photo folder of face crops")
    p.add_argument("results", metavar="RESULTS",
                   help="output URL: *.parquet for one results file, anything else for a resumable results "
                        "dataset folder")
    add_config_arguments(p, QueryConfig)
    add_json_flag(p)
    p.set_defaults(func=run_cli)


def run_cli(args) -> int:
    from pipelines.query.run import query_batch

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    summary = query_batch(args.model_url, args.gallery, args.queries, args.results, config_from_args(QueryConfig, args))
    if args.json:
        print(json.dumps({k: v for k, v in summary.items() if k != "config"}))
    return 0
