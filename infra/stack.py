"""`opqn stack`: the main job on a whole local stack, the way it runs in production.

Starts, all on 127.0.0.1: SeaweedFS (S3 API), a 2-node Ray cluster, a Prefect server with a
process work pool and worker; registers the ``opqn-pipeline`` deployment from prefect.yaml and
runs it with ``prefect deployment run --watch`` on ``s3://`` URLs, so every stage goes through
the object store (AWS_* variables), the cluster (RAY_ADDRESS) and the Prefect API
(PREFECT_API_URL) exactly as against real ones. Everything it started is stopped at the end,
also on failure or Ctrl-C; the state (S3 data, Prefect database and logs) stays in ``--home``,
so ``python -m infra.s3_server start --dir HOME/s3`` brings the outputs back for a look.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from pipelines.progress import format_seconds

BUCKET = "opqn"
POOL = "opqn-stack"


def upload_tree(local_dir: str, url: str) -> int:
    """Copy a local photo tree into the object store (the production layout: photos on S3)."""
    from storage import urls

    fs, base = urls.resolve(url)
    count = 0
    for root, _, files in os.walk(local_dir):
        for name in sorted(files):
            rel = os.path.relpath(os.path.join(root, name), local_dir)
            fs.put_file(os.path.join(root, name), f"{base}/{rel}")
            count += 1
    return count


def list_outputs(workdir: str) -> dict[str, int]:
    """Objects the pipeline left under the work folder, with their sizes."""
    from storage import urls

    fs, base = urls.resolve(workdir)
    return {path[len(base):].lstrip("/"): int(info.get("size") or 0)
            for path, info in sorted(fs.find(base, detail=True).items())}


def run_stack(home: str, data: str = "", upload: bool = False, options: dict | None = None,
              nodes: int = 2, cpus_per_node: float = 2, timeout: float = 3600, out=None) -> dict:
    """Start the stack, run the opqn-pipeline deployment on it, stop the stack; returns a summary."""
    from infra import prefect_local, ray_local
    from infra.s3_server import start_s3_server
    from pipelines.main_job.run import PipelineConfig

    out = out or sys.stdout
    home_dir = Path(home).resolve()
    home_dir.mkdir(parents=True, exist_ok=True)
    source = data or PipelineConfig().source()
    workdir = f"s3://{BUCKET}/pipeline"
    t0 = time.monotonic()
    stopping: list = []
    saved_env = dict(os.environ)

    def say(msg: str) -> None:
        print(f"[stack] {msg}", file=out, flush=True)

    try:
        s3 = start_s3_server(home_dir / "s3")
        stopping.append(("S3 server", s3.stop))
        # Set before Ray and Prefect start, so their workers and flow runs inherit it.
        os.environ.update(s3.env())
        from storage import urls

        fs, _ = urls.resolve(f"s3://{BUCKET}")
        if not fs.exists(BUCKET):
            fs.mkdir(BUCKET)
        say(f"S3 API at {s3.endpoint} (data in {home_dir / 's3'}), bucket s3://{BUCKET}")
        if upload:
            n = upload_tree(source, f"s3://{BUCKET}/photos")
            source = f"s3://{BUCKET}/photos"
            say(f"uploaded {n} photo files to {source}")

        ray_proc, address = ray_local.start(nodes=nodes, cpus_per_node=cpus_per_node)
        stopping.append(("Ray cluster", lambda: ray_local.stop_pid(ray_proc.pid)))
        os.environ["RAY_ADDRESS"] = address
        say(f"Ray cluster: {nodes} nodes x {cpus_per_node:g} CPU at {address}")

        prefect = prefect_local.start(home_dir / "prefect", pool=POOL)
        stopping.append(("Prefect server and worker", prefect.stop))
        say(f"Prefect API at {prefect.api_url}, work pool {POOL} with a process worker")
        prefect_local.deploy(prefect, "opqn-pipeline")
        params = {"data": source, "workdir": workdir, "options": options or {}}
        say(f"prefect deployment run opqn-pipeline/opqn-pipeline --params '{json.dumps(params)}' --watch")
        run = subprocess.run([prefect_local.prefect_bin(), "deployment", "run", "opqn-pipeline/opqn-pipeline",
                              "--params", json.dumps(params), "--watch", "--watch-timeout", str(int(timeout))],
                             env=prefect.env(), capture_output=True, text=True, timeout=timeout + 120)
        worker_log = (prefect.home / "worker.log").read_text(errors="replace")
        print(worker_log[-20000:] if run.returncode else _pipeline_lines(worker_log), file=out, flush=True)
        if run.returncode != 0 or "Completed" not in run.stdout + run.stderr:
            raise RuntimeError(f"the opqn-pipeline flow run did not complete (exit {run.returncode}):\n"
                               f"{run.stdout[-3000:]}\n{run.stderr[-3000:]}")
        outputs = list_outputs(workdir)
        summary = {"workdir": workdir, "source": source, "ray_address": address, "prefect_api": prefect.api_url,
                   "s3_endpoint": s3.endpoint, "home": str(home_dir), "objects": len(outputs),
                   "bytes": sum(outputs.values()), "outputs": outputs}
    finally:
        for name, stop in reversed(stopping):
            try:
                stop()
                say(f"stopped {name}")
            except Exception as exc:  # keep stopping the rest
                say(f"could not stop {name}: {exc}")
        os.environ.clear()
        os.environ.update(saved_env)
    summary["seconds"] = round(time.monotonic() - t0, 1)
    say(f"done in {format_seconds(summary['seconds'])}: the pipeline ran on S3 + Ray ({nodes} nodes) + Prefect; "
        f"{summary['objects']} objects ({summary['bytes'] / 1e6:.1f} MB) under {workdir}; everything stopped; "
        f"state kept in {home_dir}")
    return summary


def _pipeline_lines(log: str) -> str:
    """The pipeline's own progress and summary lines from the worker log (not Prefect's chatter)."""
    keep = ("[pipeline]", "[prepare]", "[encode]", "[query]", "training OPQN", "done:", "epoch")
    return "\n".join(line for line in log.splitlines() if any(k in line for k in keep))


def register(subparsers) -> None:
    from pipelines.main_job.run import PipelineConfig
    from pipelines.config_flags import add_config_arguments

    p = subparsers.add_parser("stack", help="start S3 + 2-node Ray + Prefect on 127.0.0.1, run the main job "
                              "through them, stop them", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--home", default="runs/stack", help="state folder: S3 data, Prefect database, logs (kept)")
    p.add_argument("--upload", action="store_true", help="copy the photo tree into the bucket first and read it from s3://")
    p.add_argument("--nodes", type=int, default=2, help="Ray nodes")
    p.add_argument("--cpus-per-node", type=float, default=2, help="logical CPUs of each Ray node")
    p.add_argument("--timeout", type=float, default=3600, help="seconds the flow run may take")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON line at the end")
    add_config_arguments(p, PipelineConfig, skip=("workdir",))
    p.set_defaults(func=run_cli)


def run_cli(args) -> int:
    from dataclasses import fields

    from pipelines.main_job.run import PipelineConfig

    defaults = PipelineConfig()
    options = {f.name: getattr(args, f.name) for f in fields(PipelineConfig)
               if f.name not in ("data", "workdir") and getattr(args, f.name) != getattr(defaults, f.name)}
    summary = run_stack(args.home, args.data, args.upload, options, args.nodes, args.cpus_per_node, args.timeout)
    if args.json:
        print(json.dumps({k: v for k, v in summary.items() if k != "outputs"} | {"outputs": summary["outputs"]}))
    return 0
