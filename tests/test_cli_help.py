"""Every option and argument of every `opqn` subcommand explains itself, with its default."""
from __future__ import annotations

import argparse
import json
import shutil
from dataclasses import fields

import pytest

from pipelines.cli import build_parser


def subcommands(parser: argparse.ArgumentParser, prefix=("opqn",)):
    """(command path, parser) of every subcommand, nested ones (gallery info) included."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield prefix + (name,), sub
                yield from subcommands(sub, prefix + (name,))


def undocumented(parser: argparse.ArgumentParser) -> list[str]:
    problems = []
    for action in parser._actions:
        if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
            continue
        name = "/".join(action.option_strings) or action.dest
        if not action.help or not action.help.strip() or action.help == argparse.SUPPRESS:
            problems.append(f"{name}: no help")
        elif action.option_strings and not action.required and "default" not in action.help.lower():
            problems.append(f"{name}: default not shown")
    return problems


def test_every_option_and_argument_has_help_and_shows_its_default():
    commands = list(subcommands(build_parser()))
    assert len(commands) >= 10
    problems = [f"{' '.join(path)} {p}" for path, parser in commands for p in undocumented(parser)]
    assert not problems, "\n".join(problems)


def test_help_renders_for_every_subcommand():
    for path, parser in subcommands(build_parser()):
        text = parser.format_help()  # %-formatting of every help string
        assert "usage:" in text, path


def test_every_config_field_has_one_description():
    """The flags' help comes from the field declarations, so each field must carry one."""
    from pipelines.encode.run import EncodeConfig
    from pipelines.ingest.config import IngestConfig
    from pipelines.main_job.run import PipelineConfig
    from pipelines.query.run import QueryConfig
    from pipelines.train.config import RayTrainConfig
    from pipelines.train.local import TrainConfig

    missing = [f"{cls.__name__}.{f.name}"
               for cls in (EncodeConfig, IngestConfig, PipelineConfig, QueryConfig, RayTrainConfig, TrainConfig)
               for f in fields(cls) if not f.metadata.get("help")]
    assert not missing, missing


@pytest.mark.parametrize("argv, expected", [
    (["pipeline", "--help"], "(default: 64)"),           # crop size, from PipelineConfig's field
    (["prepare", "--help"], "--crop-size CROP_SIZE, --size CROP_SIZE"),
    (["train", "--help"], "--resume, --no-resume"),
])
def test_help_text_comes_from_the_field(argv, expected, capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(argv)
    assert expected in " ".join(capsys.readouterr().out.split())


def test_boolean_flags_show_their_default(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "continue from the checkpoint at the model URL if one exists (default: on)" in text


def test_every_command_prints_its_summary_as_json_on_request():
    leaves = [(path, parser) for path, parser in subcommands(build_parser())
              if not any(isinstance(a, argparse._SubParsersAction) for a in parser._actions)]
    missing = [" ".join(path) for path, parser in leaves
               if not any("--json" in a.option_strings for a in parser._actions)]
    assert not missing, missing


def only_json(out: str) -> dict:
    lines = out.strip().splitlines()
    assert len(lines) == 1, out
    return json.loads(lines[0])


def test_prepare_json_is_one_summary_object(lfw_dir, tmp_path, capsys):
    from pipelines.cli import main

    person = next(d for d in sorted(lfw_dir.iterdir()) if len(list(d.glob("*.jpg"))) >= 2)
    (tmp_path / "photos" / person.name).mkdir(parents=True)
    for f in sorted(person.glob("*.jpg"))[:2]:
        shutil.copy(f, tmp_path / "photos" / person.name / f.name)
    assert main(["prepare", str(tmp_path / "photos"), str(tmp_path / "ds"), "--crop-size", "32",
                 "--executor", "local", "--json"]) == 0
    summary = only_json(capsys.readouterr().out)
    assert summary["photos"] == 2 and summary["processed"] == 2
    assert summary["faces"] + sum(summary["rejected"].values()) == 2


def test_pipeline_json_prints_only_the_summary(monkeypatch, capsys):
    """The stage lines go to stderr with --json; stdout is the summary run_pipeline returns."""
    import sys

    from pipelines.main_job import run as pipeline
    from pipelines.cli import main

    def fake_run(cfg, out=None):
        assert out is sys.stderr and cfg.epochs == 3
        print("[pipeline] stage lines", file=out)
        return {"urls": {"summary": "w/summary.json"}, "stages": {"train": {"epochs": 3}}, "seconds": 1.0,
                "config": {"epochs": 3}}

    monkeypatch.setattr(pipeline, "run_pipeline", fake_run)
    assert main(["pipeline", "--epochs", "3", "--json"]) == 0
    captured = capsys.readouterr()
    assert only_json(captured.out) == {"urls": {"summary": "w/summary.json"}, "stages": {"train": {"epochs": 3}},
                                       "seconds": 1.0}
    assert "[pipeline] stage lines" in captured.err
