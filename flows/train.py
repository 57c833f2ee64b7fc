"""Prefect flow ``train-opqn``: schedules distributed training; all logic is in ``pipelines.train``.

With ``ray_jobs_address`` (a Ray cluster's dashboard URL, e.g. http://head:8265) the run is
submitted through the Ray Jobs API under a submission id derived from its settings, so a
retried flow follows the job it started instead of starting a second one, its log is
followed into the flow run, and cancelling the flow stops it (flows/ray_job.py); otherwise
the pipeline runs here, on in-process Ray or on the cluster named by RAY_ADDRESS.
"""
from __future__ import annotations

from dataclasses import fields

from prefect import flow, get_run_logger

from flows.options import config_with_options, options_model
from flows.ray_job import run_train_job
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


def submit_ray_job(cfg: RayTrainConfig, address: str, poll_seconds: float = 1.0) -> dict:
    """Run `opqn train` as a Ray job on the cluster (or follow this run's job already there) and
    stream its log into this flow run; cancelling the flow run stops the job."""
    logger = get_run_logger()
    return run_train_job(address, _cli_args(cfg), cfg.model_url, logger.info, poll_seconds)


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
