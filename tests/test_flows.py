"""`prefect deployment run train-opqn/train-opqn` against a real local Prefect server and worker."""
import json
import subprocess

import pytest

from face_datasets import write_face_dataset
from flows.train import _cli_args, train_opqn
from infra.prefect_local import deploy, prefect_bin, start
from pipelines.formats.checkpoint import load_checkpoint, model_from_checkpoint
from pipelines.train.config import RayTrainConfig

TINY_OPTIONS = {"dim": 64, "width": 0.125, "image_size": 32, "batch_size": 16}


@pytest.fixture(scope="module")
def prefect_stack(tmp_path_factory):
    stack = start(tmp_path_factory.mktemp("prefect-home"), pool="opqn-test")
    yield stack
    stack.stop(timeout=3)  # a throwaway server: no need to wait out a slow graceful shutdown


def test_deployment_run_completes_and_leaves_a_loadable_checkpoint(prefect_stack, lfw_dir, tmp_path):
    dataset = write_face_dataset(tmp_path / "faces", lfw_dir, identities=6, photos=8, size=40)
    model_url = tmp_path / "model" / "opqn.pt"
    deploy(prefect_stack, "train-opqn")
    params = {"dataset": str(dataset), "model_url": str(model_url), "bits": 16, "codewords": 16,
              "epochs": 1, "workers": 1, "options": TINY_OPTIONS}
    out = subprocess.run([prefect_bin(), "deployment", "run", "train-opqn/train-opqn", "--params", json.dumps(params),
                          "--watch"], env=prefect_stack.env(), capture_output=True, text=True, timeout=600)
    worker_log = (prefect_stack.home / "worker.log").read_text()[-4000:]
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:] + worker_log
    assert "Completed" in out.stdout + out.stderr, out.stdout[-3000:]
    state = load_checkpoint(str(model_url))
    assert state["epoch"] == 1
    model = model_from_checkpoint(state)
    assert (model.cfg.M, model.cfg.K, model.cfg.D) == (4, 16, 64)


def test_flow_parameters_are_validated_before_anything_starts(tmp_path):
    with pytest.raises(ValueError, match="unknown training options"):
        train_opqn.fn(dataset=str(tmp_path), model_url=str(tmp_path / "m.pt"), options={"epoch": 3})
    with pytest.raises(ValueError, match="K <= D/M"):
        train_opqn.fn(dataset=str(tmp_path), model_url=str(tmp_path / "m.pt"), bits=16, codewords=256,
                      options={"dim": 256})


@pytest.mark.parametrize("flow_module, flow_name", [
    ("flows.train", "train_opqn"), ("flows.encode", "encode_gallery_flow"), ("flows.query", "query_batch_flow"),
    ("flows.pipeline", "opqn_pipeline_flow"), ("flows.prepare", "prepare_dataset_flow")])
def test_flow_options_are_typed_fields_with_defaults_and_help(flow_module, flow_name):
    """What Prefect's UI and `deployment run --param` see: every option a typed field with its
    default and description, and unknown names refused by Prefect's own validation."""
    import importlib

    from prefect.utilities.callables import parameter_schema

    flow = getattr(importlib.import_module(flow_module), flow_name)
    schema = parameter_schema(flow.fn).model_dump()
    options = next(d for name, d in schema["definitions"].items() if name.endswith("Options"))
    assert options["additionalProperties"] is False
    fields = options["properties"]
    assert len(fields) >= 5
    missing = {name: f for name, f in fields.items() if "default" not in f or not f.get("description")}
    assert missing == {}
    required = {name: "x" for name in schema.get("required", [])}
    with pytest.raises(Exception, match="no_such_setting"):
        flow.validate_parameters({**required, "options": {"no_such_setting": 1}})
    assert flow.validate_parameters({**required, "options": {}})["options"] is not None


def test_ray_job_entrypoint_carries_every_non_default_setting():
    cfg = RayTrainConfig(dataset="s3://b/ds", model_url="s3://b/m.pt", bits=16, codewords=16, use_gpu=True, epochs=3,
                         train_splits=("train",))
    args = _cli_args(cfg)
    assert args[:4] == ["opqn", "train", "s3://b/ds", "s3://b/m.pt"]
    assert {"--bits", "--codewords", "--use-gpu", "--epochs", "--train-splits"} <= set(args)
    assert args[args.index("--train-splits") + 1] == "train"


def test_nightly_encode_deployment_runs_on_a_cron_schedule(prefect_stack, monkeypatch):
    import os

    env = {**prefect_stack.env(), "OPQN_NIGHTLY_MODEL": "s3://bucket/models/opqn.pt",
           "OPQN_NIGHTLY_DATASET": "s3://bucket/faces", "OPQN_NIGHTLY_GALLERY": "s3://bucket/gallery"}
    out = subprocess.run([prefect_bin(), "--no-prompt", "deploy", "--name", "encode-gallery-nightly"], env=env,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    shown = subprocess.run([prefect_bin(), "deployment", "inspect", "encode-gallery/encode-gallery-nightly"],
                           env=env, capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0, shown.stderr[-2000:]
    assert "0 2 * * *" in shown.stdout
    assert "s3://bucket/gallery" in shown.stdout
    assert "'limit': 1" in shown.stdout and "ENQUEUE" in shown.stdout, shown.stdout  # one writer run at a time


def test_encode_flow_rejects_unknown_options(tmp_path):
    from flows.encode import encode_gallery_flow

    with pytest.raises(ValueError, match="unknown encode options"):
        encode_gallery_flow.fn(model_url="m.pt", dataset=str(tmp_path), gallery=str(tmp_path / "g"),
                               options={"shards": 3})


def test_ray_job_id_names_the_run_so_a_retry_finds_its_job():
    """The submission id is the lock against a second job training into the same model URL:
    the same settings give the same id, another model URL or setting another."""
    from flows.ray_job import submission_id

    cfg = RayTrainConfig(dataset="s3://b/ds", model_url="s3://b/m.pt", epochs=3)
    ids = {submission_id(_cli_args(c)) for c in (cfg, RayTrainConfig(**{**cfg.__dict__, "model_url": "s3://b/n.pt"}),
                                                 RayTrainConfig(**{**cfg.__dict__, "epochs": 4}))}
    assert submission_id(_cli_args(RayTrainConfig(**cfg.__dict__))) in ids and len(ids) == 3
    assert submission_id(_cli_args(cfg), 2) == submission_id(_cli_args(cfg)) + "-2"
