"""Operations files agree with the code: cluster configs, the Prefect set-up script, the S3
settings example and docs/operations.md (deployments, parameters, `opqn` command lines)."""
from __future__ import annotations

import ast
import os
import re
import shlex
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "operations.md"
RAY_CLUSTER = ROOT / "infra" / "cluster" / "ray-cluster.yaml"
KUBERAY = ROOT / "infra" / "cluster" / "kuberay-raycluster.yaml"
DOCKERFILE = ROOT / "infra" / "cluster" / "Dockerfile"
WORK_POOL_SCRIPT = ROOT / "infra" / "prefect" / "setup-work-pool.sh"
S3_ENV = ROOT / "infra" / "s3.env.example"

# `opqn` subcommands and deployments being written elsewhere: checked once they exist.
PENDING_SUBCOMMANDS = {"pipeline", "stack", "view"}
PENDING_DEPLOYMENTS = {"opqn-pipeline": "flows/pipeline.py:opqn_pipeline_flow"}


# --------------------------------------------------------------------------- helpers

def bash_commands(text: str) -> list[str]:
    """Command lines of the ```bash blocks, continuation lines joined, comment lines dropped."""
    out = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            if line.strip() and not line.lstrip().startswith("#"):
                out.append(line.strip())
    return out


def opqn_argv(line: str) -> list[str] | None:
    """The arguments after `opqn` in a command line (env assignments and `ray job submit --` skipped)."""
    tokens = shlex.split(line, comments=True)
    while tokens and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", tokens[0]):
        tokens = tokens[1:]
    if tokens and os.path.basename(tokens[0]) == "opqn":
        return tokens[1:]
    if "--" in tokens:
        rest = tokens[tokens.index("--") + 1:]
        if rest and os.path.basename(rest[0]) == "opqn":
            return rest[1:]
    return None


def flow_of(entrypoint: str) -> tuple[str, set[str]] | None:
    """(flow name from @flow(name=...), parameter names) of `path.py:function`; None if the file is missing."""
    path, func = entrypoint.split(":")
    if not (ROOT / path).exists():
        return None
    tree = ast.parse((ROOT / path).read_text())
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name == func:
            name = func.replace("_", "-")
            for deco in node.decorator_list:
                if isinstance(deco, ast.Call) and getattr(deco.func, "id", "") == "flow":
                    for kw in deco.keywords:
                        if kw.arg == "name":
                            name = kw.value.value
            args = node.args
            return name, {a.arg for a in args.args + args.kwonlyargs}
    raise AssertionError(f"{entrypoint}: no function {func}")


def deployments() -> dict[str, str]:
    """Deployment name -> entrypoint, from prefect.yaml."""
    spec = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    return {d["name"]: d["entrypoint"] for d in spec["deployments"]}


def registered_subcommands(parser) -> set[str]:
    return {name for action in parser._subparsers._group_actions for name in action.choices}


def strict(parser):
    """The parser and all its subparsers without prefix matching: docs must spell flags out."""
    parser.allow_abbrev = False
    for action in parser._actions:
        if isinstance(action.choices, dict):  # subcommands
            for sub in action.choices.values():
                strict(sub)
    return parser


def ray_version() -> str:
    from importlib.metadata import version

    return version("ray")


# --------------------------------------------------------------------------- Ray cluster launcher

def test_ray_cluster_launcher_config_is_valid_for_this_ray():
    from ray.autoscaler._private.util import validate_config

    config = yaml.safe_load(RAY_CLUSTER.read_text())
    validate_config(config)  # Ray's own schema (ray-schema.json) plus its consistency checks
    assert config["provider"]["type"] == "aws"
    types = config["available_node_types"]
    head = config["head_node_type"]
    workers = {name: t for name, t in types.items() if name != head}
    gpu = [n for n, t in workers.items() if re.match(r"[gp]\d", t["node_config"]["InstanceType"])]
    cpu = [n for n in workers if n not in gpu]
    assert head in types and cpu and gpu, types.keys()
    assert all(types[n].get("min_workers", 0) == 0 for n in gpu), "GPU nodes only on demand"
    assert sum(types[n].get("min_workers", 0) for n in cpu) >= 1, "a cluster with a CPU-less head needs CPU workers"

    setup = "\n".join(config["setup_commands"])
    assert "bash infra/setup.sh" in setup
    assert f"ray[default]=={ray_version()}" in setup
    # the repository is copied (not the local virtualenv), the S3 settings file next to it
    mounts = config["file_mounts"]
    assert "." in mounts.values() and any(v.endswith("s3.env") for v in mounts.values())
    assert ".venv" in config["rsync_exclude"]
    # Ray starts with the S3 settings and the virtualenv in its environment
    for key, start in (("head_start_ray_commands", "ray start --head"), ("worker_start_ray_commands", "ray start --address")):
        commands = config[key]
        assert any(start in c for c in commands), commands
        assert all("opqn-env.sh" in c for c in commands if "ray " in c), commands
    assert "s3.env" in setup and ".venv/bin" in setup


# --------------------------------------------------------------------------- KubeRay

def _container(template: dict) -> dict:
    containers = template["spec"]["containers"]
    assert len(containers) >= 1
    return containers[0]


def _check_container(c: dict, image: str | None = None) -> None:
    assert c["image"] and (image is None or c["image"] == image)
    secrets = [e["secretRef"]["name"] for e in c.get("envFrom", []) if "secretRef" in e]
    assert secrets == ["opqn-s3"], c.get("envFrom")
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(c["resources"][kind]), c["resources"]


def test_kuberay_raycluster_has_head_and_worker_groups_with_s3_secret():
    doc = yaml.safe_load(KUBERAY.read_text())
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayCluster"
    spec = doc["spec"]
    assert spec["rayVersion"] == ray_version()
    head = spec["headGroupSpec"]
    assert all(isinstance(v, str) for v in head["rayStartParams"].values()), "rayStartParams values are strings"
    head_c = _container(head["template"])
    _check_container(head_c)
    assert {p["containerPort"] for p in head_c["ports"]} >= {6379, 8265, 10001}
    groups = spec["workerGroupSpecs"]
    assert groups
    for g in groups:
        assert g["groupName"] and isinstance(g["rayStartParams"], dict)
        assert g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]
        _check_container(_container(g["template"]), head_c["image"])


def test_kuberay_commented_gpu_group_is_valid_once_uncommented():
    lines = KUBERAY.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip() == "# - groupName: gpu")
    indent = lines[start].index("#")
    block = []
    for line in lines[start:]:
        if not line.startswith(" " * indent + "#"):
            break
        block.append(line[indent + 2:])
    group = yaml.safe_load("\n".join(block))[0]
    c = _container(group["template"])
    _check_container(c)
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert group["minReplicas"] == 0


def test_dockerfile_installs_the_repository_with_setup_sh():
    text = DOCKERFILE.read_text()
    assert re.search(r"^FROM python:3\.11", text, flags=re.M)
    assert "bash infra/setup.sh" in text and f"ray[default]=={ray_version()}" in text
    assert not re.search(r"^COPY \. ", text, flags=re.M), "copy named paths: never .venv or a settings file"
    for path in ("model", "storage", "pipelines", "flows", "pyproject.toml", "prefect.yaml"):
        assert re.search(rf"^COPY .*\b{re.escape(path)}\b", text, flags=re.M), path
    assert "/opt/opqn/.venv/bin" in text


# --------------------------------------------------------------------------- Prefect work pool script

def test_setup_work_pool_script_is_valid_bash():
    subprocess.run(["bash", "-n", str(WORK_POOL_SCRIPT)], check=True)


FAKE_PREFECT = """#!/usr/bin/env bash
echo "$PWD|$OPQN_WORK_POOL|$OPQN_REPO_DIR|$OPQN_NIGHTLY_GALLERY|$*" >> "$FAKE_LOG"
if [ "$2" = work-pool ] && [ "$3" = inspect ]; then [ -f "$FAKE_POOL" ]; exit; fi
if [ "$2" = work-pool ] && [ "$3" = create ]; then touch "$FAKE_POOL"; fi
exit 0
"""


def test_setup_work_pool_creates_the_pool_once_and_deploys_everything(tmp_path):
    fake = tmp_path / "prefect"
    fake.write_text(FAKE_PREFECT)
    fake.chmod(0o755)
    log = tmp_path / "calls.log"
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "PREFECT": str(fake), "FAKE_LOG": str(log),
           "FAKE_POOL": str(tmp_path / "pool"), "PREFECT_API_URL": "http://127.0.0.1:1/api",
           "OPQN_WORK_POOL": "opqn-ops", "OPQN_NIGHTLY_MODEL": "s3://b/m.pt",
           "OPQN_NIGHTLY_DATASET": "s3://b/faces", "OPQN_NIGHTLY_GALLERY": "s3://b/gallery"}

    def run(extra=None):
        return subprocess.run(["bash", str(WORK_POOL_SCRIPT)], env={**env, **(extra or {})}, cwd=tmp_path,
                              capture_output=True, text=True, timeout=60)

    first = run()
    assert first.returncode == 0, first.stderr
    calls = log.read_text().splitlines()
    assert [c.split("|")[-1] for c in calls] == [
        "--no-prompt work-pool inspect opqn-ops", "--no-prompt work-pool create opqn-ops --type process",
        "--no-prompt deploy --all"]
    cwd, pool, repo, gallery, _ = calls[-1].split("|")
    assert (Path(cwd), pool, Path(repo), gallery) == (ROOT, "opqn-ops", ROOT, "s3://b/gallery")
    assert "prefect worker start --pool opqn-ops" in first.stdout

    log.unlink()
    again = run({"OPQN_REPO_DIR": "/srv/opqn"})
    assert again.returncode == 0, again.stderr
    calls = log.read_text().splitlines()
    assert [c.split("|")[-1] for c in calls] == ["--no-prompt work-pool inspect opqn-ops", "--no-prompt deploy --all"]
    assert calls[-1].split("|")[2] == "/srv/opqn"

    log.unlink()
    missing = run({"OPQN_NIGHTLY_GALLERY": ""})
    assert missing.returncode == 2 and "OPQN_NIGHTLY_GALLERY" in missing.stderr
    assert not log.exists()


# --------------------------------------------------------------------------- S3 settings

def test_s3_env_example_names_every_variable_storage_reads_in_env_file_format():
    from storage.urls import _S3_ENV

    text = S3_ENV.read_text()
    for var in _S3_ENV:
        assert re.search(rf"^#? ?{var}=", text, flags=re.M), f"{var} missing from {S3_ENV.name}"
    for line in text.splitlines():
        if line and not line.startswith("#"):
            # KEY=value, no quotes, no export: readable by `set -a; .` and `kubectl --from-env-file`
            assert re.fullmatch(r"[A-Z][A-Z0-9_]*=[^\s'\"]*", line), line
    assert re.search(r"^AWS_SECRET_ACCESS_KEY=REPLACE", text, flags=re.M), "placeholders only"


# --------------------------------------------------------------------------- docs/operations.md

def test_every_deployment_is_documented_with_its_flow_name():
    text = DOC.read_text()
    for name, entrypoint in deployments().items():
        flow_name, _ = flow_of(entrypoint)
        assert f"`{flow_name}/{name}`" in text, f"{flow_name}/{name} not in {DOC.name}"
        assert f"prefect deployment run {flow_name}/{name}" in text
        assert entrypoint in text


def test_documented_deployment_runs_use_real_flow_and_parameter_names():
    from prefect.cli._utilities import load_json_key_values

    from pipelines.encode.run import EncodeConfig
    from pipelines.query.run import QueryConfig
    from pipelines.train.config import RayTrainConfig

    option_fields = {
        "train-opqn": {f.name for f in fields(RayTrainConfig)} - {"dataset", "model_url", "run_id"},
        "encode-gallery": {f.name for f in fields(EncodeConfig)},
        "query-batch": {f.name for f in fields(QueryConfig)} - {"top_k", "split"},
    }
    if (ROOT / "pipelines" / "pipeline.py").exists():
        from pipelines.main_job.run import PipelineConfig

        option_fields["opqn-pipeline"] = {f.name for f in fields(PipelineConfig)} - {"data", "workdir"}
    known = {**PENDING_DEPLOYMENTS, **deployments()}
    runs = [shlex.split(c) for c in bash_commands(DOC.read_text()) if c.startswith("prefect deployment run ")]
    assert len(runs) >= len(deployments())
    checked = set()
    for argv in runs:
        flow_name, deployment = argv[3].split("/")
        assert deployment in known, f"unknown deployment {argv[3]}"
        found = flow_of(known[deployment])
        if found is None:
            assert deployment in PENDING_DEPLOYMENTS
            continue
        assert flow_name == found[0], f"{argv[3]}: the flow is named {found[0]}"
        pairs = [argv[i + 1] for i, a in enumerate(argv) if a == "--param"]
        params = load_json_key_values(pairs, "parameter")
        assert set(params) <= found[1], f"{argv[3]}: unknown parameters {set(params) - found[1]}"
        if isinstance(params.get("options"), dict) and flow_name in option_fields:
            unknown = set(params["options"]) - option_fields[flow_name]
            assert not unknown, f"{argv[3]}: unknown options {unknown}"
        checked.add(deployment)
    assert set(deployments()) <= checked | set(PENDING_DEPLOYMENTS)


def test_opqn_command_lines_in_docs_parse():
    from pipelines.cli import build_parser

    parser = build_parser()
    registered = registered_subcommands(parser)
    parsed = set()
    for line in bash_commands(DOC.read_text()):
        argv = opqn_argv(line)
        if argv is None:
            continue
        if argv[0] not in registered:
            assert argv[0] in PENDING_SUBCOMMANDS, f"no subcommand {argv[0]!r}: {line}"
            continue
        try:
            strict(build_parser()).parse_args(argv)
        except SystemExit:
            pytest.fail(f"does not parse: {line}")
        parsed.add(argv[0])
    assert {"prepare", "train", "encode", "query", "gallery", "evaluate"} <= parsed, parsed


def test_documented_orphan_listing_finds_uncommitted_files(tmp_path):
    import pyarrow as pa

    from storage.manifest import Delta, commit, write_data_file

    line = next(c for c in bash_commands(DOC.read_text()) if "orphans" in c)
    argv = shlex.split(line)
    assert argv[0] == ".venv/bin/python" and argv[1] == "-c"
    gallery = str(tmp_path / "gallery")
    table = pa.table({"face_id": ["a"]})
    listed = write_data_file(gallery, table, subdir="codes")
    commit(gallery, Delta(add=(listed,)))
    orphan = write_data_file(gallery, table, subdir="codes")  # written, never committed
    out = subprocess.run([sys.executable, "-c", argv[2], gallery], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [orphan.path]
