"""`opqn stack`: SeaweedFS + a 2-node Ray cluster + a Prefect server and worker on 127.0.0.1, the
opqn-pipeline deployment run through them on s3:// URLs, then everything stopped."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from test_pipeline import photo_tree

REPO = Path(__file__).resolve().parent.parent
OPTIONS = ["--min-photos", "10", "--crop-size", "40", "--bits", "16", "--codewords", "16", "--width", "0.125",
           "--epochs", "1", "--batch-size", "32", "--workers", "2", "--top-k", "10", "--view-queries", "4",
           "--view-top-k", "3", "--store-features", "--rerank", "20"]


def started_by(endpoint: str, home: Path) -> list[str]:
    """Processes still alive that the stack started: they carry its S3 endpoint or its home folder."""
    left = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            if p.pid == os.getpid():
                continue
            cmd = " ".join(p.info["cmdline"] or [])
            if str(home) in cmd or p.environ().get("AWS_ENDPOINT_URL") == endpoint:
                left.append(f"{p.pid} {cmd[:120]}")
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return left


def test_stack_runs_the_pipeline_deployment_on_s3_ray_and_prefect_then_stops(tmp_path, lfw_dir):
    data = photo_tree(lfw_dir, tmp_path / "photos", identities=4, photos=10)
    home = tmp_path / "stack"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "RAY_ADDRESS", "PREFECT_"))}
    out = subprocess.run([sys.executable, "-m", "pipelines.cli", "stack", "--home", str(home), "--data", str(data),
                          "--upload", "--json", *OPTIONS], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=900)
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-4000:]
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert summary["source"] == "s3://opqn/photos" and summary["workdir"] == "s3://opqn/pipeline"
    outputs = summary["outputs"]
    for name in ("model.pt", "summary.json", "results.parquet", "dataset/manifest.json", "report/metrics.json", "report/pr.png",
                 "viewer/index.html"):
        assert outputs.get(name, 0) > 0, f"{name} missing from {sorted(outputs)}"
    assert [n for n in outputs if n.startswith("gallery/") and n.endswith("/manifest.json")], sorted(outputs)
    assert [n for n in outputs if n.startswith("gallery/") and "/features/" in n], sorted(outputs)  # for --rerank
    assert "[pipeline] done in" in out.stdout and "stopped Ray cluster" in out.stdout
    assert not started_by(summary["s3_endpoint"], home), "processes left running"

    # The outputs are really in the object store: bring it back up on the same data and read them.
    from infra.s3_server import start_s3_server
    from pipelines.formats.checkpoint import load_checkpoint

    s3 = start_s3_server(home / "s3")
    try:
        opts = s3.storage_options()
        state = load_checkpoint("s3://opqn/pipeline/model.pt", opts)
        assert state["epoch"] == 1 and len(state["nodes"]) == 2, state.get("nodes")  # DDP over both Ray nodes
        from storage import files

        metrics = json.loads(files.read_all("s3://opqn/pipeline/report/metrics.json", opts))
        assert 0.0 <= metrics["results"][0]["quantized"]["map"] <= 1.0
        assert metrics["context"]["dataset"] == "s3://opqn/pipeline/dataset"
    finally:
        s3.stop()
