"""Prefect flow ``train-opqn``: schedules distributed training; all logic is in ``pipelines.train``.

With ``ray_jobs_address`` (a Ray cluster's dashboard URL, e.g. http://head:8265) the run is
submitted through the Ray Jobs API and its logs are followed; otherwise the pipeline runs
here, on in-process Ray or on the cluster named by RAY_ADDRESS.
"""
from __future__ import annotations

import shlex
import time
from dataclasses import fields

from prefect import flow, get_run_logger

from flows.options import config_with_options, options_model
from pipelines.train.config import RayTrainConfig

FLOW_PARAMETERS = ("dataset", "model_url", "bits", "codewords", "epochs", "workers", "use_gpu")
TrainOptions = options_model(RayTrainConfig, exclude=FLOW_PARAMETERS + ("run_id",))


def _cli_args(cfg: RayTrainConfig) -> list[str]:
    args = ["opqn", "train", cfg.dataset, cfg.model_url]
    default = RayTrainConfig()
    for f in fields(RayTrainConfig):
        value = getattr(cfg, f.name)
        if f.name in ("dataset", "model_url", "run_id") or value == getattr(default, f.name):
            continue
        flag = "--" + f.name.replace("_", "-")
        if isinstance(value, bool):
            args.append(flag if value else "--no-" + f.name.replace("_", "-"))
        else:
            args += [flag, ",".join(value) if isinstance(value, tuple) else str(value)]
    return args


def submit_ray_job(cfg: RayTrainConfig, address: str, poll_seconds: float = 2.0) -> dict:
    """Run `opqn train` as a Ray job on the cluster and stream its logs into this flow run."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    logger = get_run_logger()
    client = JobSubmissionClient(address)
    entrypoint = shlex.join(_cli_args(cfg))
    job_id = client.submit_job(entrypoint=entrypoint)
    logger.info("submitted Ray job %s: %s", job_id, entrypoint)
    seen = 0
    while True:
        status = client.get_job_status(job_id)
        logs = client.get_job_logs(job_id)
        for line in logs[seen:].splitlines():
            logger.info(line)
        seen = len(logs)
        if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
            break
        time.sleep(poll_seconds)
    if status != JobStatus.SUCCEEDED:
        raise RuntimeError(f"Ray job {job_id} ended {status}: {client.get_job_info(job_id).message}")
    return {"model_url": cfg.model_url, "ray_job_id": job_id}


@flow(name="train-opqn", log_prints=True)
def train_opqn(dataset: str, model_url: str, bits: int = 32, codewords: int = 256, epochs: int = 20,
               workers: int = 2, use_gpu: bool = False, options: TrainOptions | None = None,
               ray_jobs_address: str = "") -> dict:
    """Train OPQN on DATASET (face shards) and write the checkpoint to MODEL_URL.

    ``options`` takes any other `opqn train` setting by name (dim, image_size, width,
    batch_size, lr, variant, ...); unknown names are rejected before anything starts.
    """
    cfg = config_with_options(RayTrainConfig, "training",
                              {"dataset": dataset, "model_url": model_url, "bits": bits, "codewords": codewords,
                               "epochs": epochs, "workers": workers, "use_gpu": use_gpu}, options, hidden=("run_id",))
    cfg.opqn_config(2)  # shape errors (K > D/M, bits not a multiple of log2 K) before any submission
    if ray_jobs_address:
        return submit_ray_job(cfg, ray_jobs_address)
    from pipelines.train.run import train

    result = train(cfg)
    return {"model_url": result["model_url"], "epoch": result["epoch"], "loss": result["history"][-1]["loss"],
            "nodes": len(result["nodes"])}
