"""The `opqn` console command: one entry point, one subcommand per pipeline stage.

Each stage module exposes ``register(subparsers)``, which adds its subcommand and sets
``func`` to a function taking the parsed arguments; the stage logic itself lives in plain
functions so the Python API mirrors the CLI.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from pipelines.config_flags import explain_defaults

# Stage modules, in pipeline order. Adding a stage is one line here.
STAGES = [
    "pipelines.ingest.cli",
    "pipelines.train.cli",
    "pipelines.query.cli",
    "pipelines.encode.cli",
    "pipelines.evaluate.cli",
    "pipelines.view.cli",
    "pipelines.pipeline",
    "infra.stack",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="opqn",
        description="Face image retrieval with OPQN: prepare, train, encode, query, evaluate.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in STAGES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name and name.startswith(exc.name):
                continue  # stage not built yet
            raise
        module.register(sub)
    explain_defaults(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        result = args.func(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"opqn {args.command}: error: {exc}", file=sys.stderr)
        return 1
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
