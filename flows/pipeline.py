"""Prefect flow ``opqn-pipeline``: the main job, one Prefect task per stage; logic in ``pipelines.main_job``.

Stages run in order in the flow's process (in-process Ray, or the cluster named by
RAY_ADDRESS). A failed run is retried by running the flow again with the same work folder:
each stage skips or resumes what an earlier run finished.
"""
from __future__ import annotations

import os

from prefect import flow, task

from flows.options import config_with_options, options_model
from pipelines.main_job.run import STAGES, PipelineConfig, run_stage, stage_urls, summary_line, write_summary

PipelineOptions = options_model(PipelineConfig, exclude=("data", "workdir"))


@flow(name="opqn-pipeline", log_prints=True, retries=1, retry_delay_seconds=30)
def opqn_pipeline_flow(data: str = "", workdir: str = "runs/pipeline", options: PipelineOptions | None = None) -> dict:
    """Photos under DATA -> face shards, model, gallery, results, report and viewer under WORKDIR.

    ``options`` takes any other `opqn pipeline` setting by name (epochs, bits, min_photos,
    crop_size, width, workers, ...); unknown names are rejected before anything starts.
    """
    import sys
    import time

    from pipelines.execution import start_ray

    cfg = config_with_options(PipelineConfig, "pipeline", {"data": data, "workdir": workdir}, options)
    where = stage_urls(cfg)
    t0 = time.monotonic()
    start_ray()
    results = {}
    for name, fn in STAGES:
        results[name] = task(run_stage, name=name, task_run_name=name)(name, fn, cfg, where, sys.stdout)
    seconds = time.monotonic() - t0
    print(summary_line(results, where, seconds))
    write_summary(cfg, where, results, seconds)
    publish_artifacts(where)
    return {"urls": where, "stages": results}


def publish_artifacts(where: dict) -> None:
    """The evaluation report (markdown) and a link to the viewer page, on the flow run's page."""
    from prefect.artifacts import create_link_artifact, create_markdown_artifact

    from pipelines.evaluate.report import read_report_markdown

    create_markdown_artifact(markdown=read_report_markdown(where["report"]), key="opqn-report",
                             description="mAP, P@T, PR curves and code spread of the main job")
    viewer = where["viewer"]
    link = viewer if "://" in viewer else "file://" + os.path.abspath(viewer)
    create_link_artifact(link=link, link_text="query results viewer", key="opqn-viewer")
