"""``opqn prepare SOURCE DATASET``: the ingest stage from the command line (mirrors ``prepare_dataset``),
and the dataset's erasure commands ``opqn forget`` and ``opqn vacuum``."""
from __future__ import annotations

import argparse
import dataclasses
import json

from pipelines.config_flags import add_config_arguments, add_json_flag, config_from_args as config_from_flags

from .config import IngestConfig


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "prepare",
        help="detect, align and crop faces from a photo tree into face shards (Parquet)",
        description="Photos under SOURCE (identity/photo tree or VGGFace2 layout; local path or s3://) "
                    "become aligned face crops in DATASET/faces/part-*.parquet, rejects in DATASET/rejects/, "
                    "listed by DATASET/manifest.json. Re-running processes only photos not yet in DATASET.",
    )
    p.add_argument("source", help="photo tree URL (path, file://, s3://)")
    p.add_argument("dataset", help="output dataset URL (path, file://, s3://)")
    add_config_arguments(p, IngestConfig)
    add_json_flag(p)
    p.set_defaults(func=run_cli)

    f = subparsers.add_parser(
        "forget", help="erase faces from a dataset and from every gallery encoded from it",
        description="One recorded erasure: the faces leave DATASET (its face shards are rewritten without them) "
                    "and every gallery encoded from it (deleted and compacted away); later prepare, encode and "
                    "train never bring them back. Their old files stay for readers of older manifests until "
                    "`opqn vacuum`. Needs the writer lease of the dataset and of each of its galleries.")
    f.add_argument("dataset", metavar="DATASET", help="face dataset URL (path, file://, s3://)")
    f.add_argument("--identities", default="", help="comma-separated identities whose faces to erase (default: none)")
    f.add_argument("--face-ids", default="", help="comma-separated face ids to erase (default: none)")
    f.add_argument("--from-file", help="file with one face id per line (default: none)")
    add_json_flag(f)
    f.set_defaults(func=run_forget)

    v = subparsers.add_parser(
        "vacuum", help="delete the files of a dataset or gallery that its manifest no longer lists",
        description="Deletes every file under URL that URL/manifest.json does not list (superseded shards, "
                    "leftovers of crashed runs) and that is older than --older-than seconds, under URL's writer "
                    "lease. After `opqn forget`, vacuum the dataset and its galleries to remove every byte of the "
                    "forgotten faces.")
    v.add_argument("url", metavar="URL", help="dataset or gallery URL (path, file://, s3://)")
    v.add_argument("--older-than", type=float, default=3600.0,
                   help="keep unlisted files younger than this many seconds, for readers of an older manifest "
                        "(default: 3600)")
    add_json_flag(v)
    v.set_defaults(func=run_vacuum)


def config_from_args(args: argparse.Namespace) -> IngestConfig:
    return config_from_flags(IngestConfig, args)


def run_cli(args: argparse.Namespace) -> int:
    from .run import prepare_dataset

    result = prepare_dataset(args.source, args.dataset, config_from_args(args))
    if args.json:
        print(json.dumps(dataclasses.asdict(result)))
    return 0


def _split(text: str) -> list[str]:
    return [x.strip() for x in (text or "").split(",") if x.strip()]


def run_forget(args: argparse.Namespace) -> int:
    from .forget import forget

    ids = _split(args.face_ids)
    if args.from_file:
        with open(args.from_file) as f:
            ids += [line.strip() for line in f if line.strip()]
    identities = _split(args.identities)
    if not ids and not identities:
        raise ValueError("nothing to forget: use --identities A,B, --face-ids ID,... or --from-file FILE")
    result = forget(args.dataset, identities, ids)
    print(json.dumps(result) if args.json else
          f"{result['faces']} face(s) erased from {result['dataset']} ({result.get('shards_rewritten', 0)} shard(s) "
          f"rewritten) and from {len(result['galleries'])} gallery(ies); run `opqn vacuum` on each to delete the "
          "superseded files")
    return 0


def run_vacuum(args: argparse.Namespace) -> int:
    from storage.urls import absolute
    from storage.vacuum import vacuum

    gone = vacuum(absolute(args.url), args.older_than)
    print(json.dumps({"url": args.url, "deleted": gone}) if args.json else
          f"{len(gone)} unlisted file(s) deleted under {args.url}")
    return 0
