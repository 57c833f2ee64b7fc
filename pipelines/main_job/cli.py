"""``opqn pipeline``: the main job in one command (mirrors ``run_pipeline``)."""
from __future__ import annotations

import argparse
import json
import sys

from pipelines.config_flags import add_config_arguments, add_json_flag, config_from_args
from pipelines.main_job import run
from pipelines.main_job.run import PipelineConfig


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "pipeline", help="the main job: prepare -> train -> encode -> query -> evaluate -> viewer, in one command",
        description=run.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(p, PipelineConfig)
    add_json_flag(p)
    p.set_defaults(func=run_cli)


def run_cli(args) -> int:
    # with --json, stdout holds only the summary object; the stage lines go to stderr
    summary = run.run_pipeline(config_from_args(PipelineConfig, args), out=sys.stderr if args.json else sys.stdout)
    if args.json:
        print(json.dumps({k: v for k, v in summary.items() if k != "config"}, default=str))
    return 0
