"""`opqn encode` and `opqn gallery delete|compact|info`."""
from __future__ import annotations

import json
import sys

from pipelines.encode.run import EncodeConfig
from pipelines.config_flags import add_config_arguments, add_json_flag, config_from_args


def register(subparsers) -> None:
    p = subparsers.add_parser("encode", help="encode a face dataset's new shards into a gallery of codes (one Ray "
                                             "task per source shard)",
                              description="Writes GALLERY/codes/part-*.parquet and the manifest. --store-features "
                                          "also writes each face's l2-normalised float feature as float16 (2 x D bytes "
                                          "a face) to GALLERY/features/, for `opqn query --rerank`. --refine-bytes B "
                                          "writes a B-byte refine code a face instead (GALLERY/refine/, a product "
                                          "quantizer the gallery's first encode trains on its first --refine-sample "
                                          "faces and stores in GALLERY/quantizer/), for `opqn query --refine`: codes "
                                          "+ B bytes a face in all. --codes gallery writes, in place of the model's "
                                          "codes, the codes of a quantizer of the same M bytes trained on the "
                                          "gallery's first faces (stored beside the refine one). A gallery keeps the "
                                          "settings of its first encode (mixing is refused).")
    p.add_argument("model_url", metavar="MODEL_URL", help="checkpoint (path, file://, s3://)")
    p.add_argument("dataset", metavar="DATASET", help="face dataset URL (output of `opqn prepare`)")
    p.add_argument("gallery", metavar="GALLERY", help="gallery URL (created on first encode)")
    add_config_arguments(p, EncodeConfig)
    add_json_flag(p)
    p.set_defaults(func=run_encode)

    g = subparsers.add_parser("gallery", help="inspect and maintain a gallery: info, delete, compact")
    sub = g.add_subparsers(dest="gallery_command", required=True)
    d = sub.add_parser("delete", help="tombstone faces (queries skip them at once)")
    d.add_argument("gallery", metavar="GALLERY", help="gallery URL")
    d.add_argument("--face-ids", nargs="*", default=[], help="face ids to delete (default: none)")
    d.add_argument("--from-file", help="file with one face id per line (default: none)")
    add_json_flag(d)
    d.set_defaults(func=run_delete)
    c = sub.add_parser("compact", help="rewrite shards without deleted faces")
    c.add_argument("gallery", metavar="GALLERY", help="gallery URL")
    add_json_flag(c)
    c.set_defaults(func=run_compact)
    i = sub.add_parser("info", help="size, shards, model id, deleted count, stored float features, refine codes and "
                                    "their bytes, and the spread of the live codes (largest code bucket, distinct "
                                    "codes, codewords used, entropy) with a warning for a sink code")
    i.add_argument("gallery", metavar="GALLERY", help="gallery URL")
    add_json_flag(i)
    i.set_defaults(func=run_info)


def run_encode(args) -> int:
    from pipelines.encode.run import encode_gallery

    summary = encode_gallery(args.model_url, args.dataset, args.gallery, config_from_args(EncodeConfig, args))
    if args.json:  # the human summary is the driver's "encode done" line on stderr
        print(json.dumps(summary))
    return 0


def run_delete(args) -> int:
    from pipelines.formats.gallery_writer import delete_faces

    ids = list(args.face_ids)
    if args.from_file:
        with open(args.from_file) as f:
            ids += [line.strip() for line in f if line.strip()]
    if not ids:
        raise ValueError("no face ids given: use --face-ids ID ... or --from-file FILE")
    result = delete_faces(args.gallery, ids)
    if result["unknown"]:
        print(f"warning: {len(result['unknown'])} face id(s) not in {args.gallery} (yet): {result['unknown'][:5]}; "
              "recorded as deleted, so no later encode adds them", file=sys.stderr)
    print(json.dumps(result) if args.json else
          f"{result['deleted']} face(s) deleted from {args.gallery} ({result['already_deleted']} already deleted)")
    return 0


def run_compact(args) -> int:
    from pipelines.formats.gallery_writer import compact

    result = compact(args.gallery)
    print(json.dumps(result) if args.json else
          f"{args.gallery}: {result['rewritten']} shard(s) rewritten, {result['removed_faces']} deleted face(s) removed")
    return 0


def run_info(args) -> int:
    from pipelines.encode.gallery_info import info

    summary = info(args.gallery)
    if args.json:
        print(json.dumps(summary, default=str))
        return 0
    for key, value in summary.items():
        print(value if key == "warning" else f"{key}: {value}")  # the warning names itself
    return 0
