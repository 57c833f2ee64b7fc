"""The main job: photos -> face shards -> model -> gallery -> ranked results -> report and viewer.

Every stage is the function its own command runs (`opqn prepare`, `train`, `encode`, `query`,
`evaluate`, `view`), called with URLs under one work folder. The job is therefore as
resumable as its stages: a re-run skips photos already prepared, continues training from the
last checkpoint, encodes only new face shards, and redoes the cheap query, evaluate and view
steps. Embedded defaults (local disk, in-process Ray); ``s3://`` work folders and
``RAY_ADDRESS`` run the same job on object storage and a cluster. The Prefect flow
``opqn-pipeline`` (flows/pipeline.py) runs the same stage list as tasks; ``opqn pipeline``
(main_job/cli.py) is this module's command.
"""
from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone

from model.refine import CODE_SOURCES
from pipelines.progress import format_seconds, say
from pipelines.train.recipe import Recipe
from storage import files, urls


@dataclass
class PipelineConfig(Recipe):
    """The training recipe (the same settings and defaults as `opqn train`) plus the job's own."""

    data: str = field(default="", metadata={"help": "photo tree (identity/photo, local or s3://); \"\": "
                                                     "<OPQN_DATA>/lfw"})
    workdir: str = field(default="runs/pipeline", metadata={
        "help": "work folder URL (local or s3://) that receives dataset/, model.pt, gallery/<model id>/, "
                "results.parquet, report/, viewer/ and summary.json"})
    min_photos: int = field(default=10, metadata={"help": "identities with fewer distinct photos are rejected "
                                                           "before detection (`opqn prepare` keeps every identity "
                                                           "by default: 1)"})
    query_fraction: float = field(default=0.2, metadata={"help": "fraction of each identity's photos that are "
                                                                  "queries; the rest is training set and gallery"})
    crop_size: int = field(default=64, metadata={"help": "stored aligned crop, in pixels (small for CPU training; "
                                                          "`opqn prepare` stores 112 by default)"})
    workers: int = field(default=2, metadata={"help": "Ray Train workers (one process each, DDP)"})
    use_gpu: bool = field(default=False, metadata={"help": "train and encode on GPUs (one per training worker)"})
    top_k: int = field(default=100, metadata={"help": "results per query"})
    store_features: bool = field(default=False, metadata={"help": "gallery keeps float16 features (2 x D bytes a "
                                                                   "face) for --rerank"})
    rerank: int = field(default=0, metadata={"help": "re-score the PQ top-R by exact cosine (needs "
                                                      "--store-features); 1000 for unseen identities; 0: off"})
    codes: str = field(default="model", metadata={
        "help": "gallery codes: model (the network's own, the paper's) or gallery (a quantizer trained on the "
                "gallery's faces: better on people the model never saw); evaluate scores the same codes",
        "choices": CODE_SOURCES})
    refine_bytes: int = field(default=0, metadata={"help": "gallery keeps a compact refine code of B bytes a face "
                                                            "(60: 64 bytes with the codes); 0: none"})
    refine: int = field(default=0, metadata={"help": "re-score the PQ top-R with the refine codes (needs "
                                                      "--refine-bytes); 1000 for unseen identities; 0: off"})
    view_queries: int = field(default=40, metadata={"help": "queries shown in the viewer"})
    view_top_k: int = field(default=10, metadata={"help": "results shown per query in the viewer"})

    def source(self) -> str:
        if self.data:
            return self.data
        from pipelines.settings import dataset_dir

        return str(dataset_dir("lfw"))


def stage_urls(cfg: PipelineConfig) -> dict[str, str]:
    """Where each stage writes, all under the work folder."""
    root = cfg.workdir.rstrip("/")
    if urls.is_local(root):
        root = urls.local_path(root)  # Ray workers do not share the driver's working directory
    return {"dataset": urls.join(root, "dataset"), "model": urls.join(root, "model.pt"),
            "gallery": urls.join(root, "gallery"), "results": urls.join(root, "results.parquet"),
            "report": urls.join(root, "report"), "viewer": urls.join(root, "viewer", "index.html"),
            "summary": urls.join(root, "summary.json")}


def check_inputs(cfg: PipelineConfig) -> None:
    """Fail in a second, before Ray starts, on a photo tree that is not there or a work folder
    whose object store cannot be reached (either raises the storage error naming the fix)."""
    source = cfg.source()
    if not files.exists(source):
        raise FileNotFoundError(f"photo tree not found: {source}; pass --data with a folder of identity/photo "
                                f"files (local path or s3://)")
    if not urls.is_local(cfg.workdir):
        files.exists(cfg.workdir)  # reachable, and the credentials are accepted


def prepare(cfg: PipelineConfig, where: dict, out) -> dict:
    from pipelines.ingest.config import IngestConfig
    from pipelines.ingest.run import prepare_dataset

    ingest = IngestConfig(size=cfg.crop_size, min_photos=cfg.min_photos, query_fraction=cfg.query_fraction,
                          seed=cfg.seed)
    r = prepare_dataset(cfg.source(), where["dataset"], ingest, stream=out)
    return {"photos": r.photos, "processed": r.processed, "faces_written": r.faces,
            "rejected": sum(r.rejected.values()), "rejected_by_reason": r.rejected}


def train(cfg: PipelineConfig, where: dict, out) -> dict:
    from pipelines.train.config import RayTrainConfig
    from pipelines.train.run import train as ray_train

    recipe = {f.name: getattr(cfg, f.name) for f in fields(Recipe)}
    rc = RayTrainConfig(**recipe, dataset=where["dataset"], model_url=where["model"], train_splits=("database",),
                        workers=cfg.workers, use_gpu=cfg.use_gpu)
    r = ray_train(rc, out=out)
    last = r["history"][-1] if r["history"] else {}
    return {"epochs": r["epoch"], "faces": r["faces"], "identities": r["identities"],
            "loss": last.get("loss"), "acc": last.get("acc")}


def model_gallery(where: dict, codes: str = "model") -> str:
    """The gallery of the current model: ``gallery/<model id>`` (``<model id>-gallery-codes``
    with ``codes="gallery"``, so switching the code source encodes beside the other).

    A gallery is bound to the model that encoded it, so a re-run that trained further (more
    epochs, another code length) encodes into a new gallery beside the old one instead of
    being refused or overwriting it.
    """
    from pipelines.formats.checkpoint import checkpoint_model_id

    suffix = "-gallery-codes" if codes == "gallery" else ""
    return urls.join(where["gallery"], checkpoint_model_id(where["model"]) + suffix)


def encode(cfg: PipelineConfig, where: dict, out) -> dict:
    from pipelines.encode.run import EncodeConfig, encode_gallery
    from pipelines.formats.gallery import require_gallery

    gallery_url = model_gallery(where, cfg.codes)
    r = encode_gallery(where["model"], where["dataset"], gallery_url,
                       EncodeConfig(splits=("database",), use_gpu=cfg.use_gpu, store_features=cfg.store_features,
                                    refine_bytes=cfg.refine_bytes, codes=cfg.codes),
                       out=out)
    gallery = require_gallery(gallery_url)
    return {"gallery": gallery_url, "encoded_now": r["faces"], "gallery_codes": gallery.rows,
            "code_shards": len(gallery.shards), "bytes_per_code": gallery.bytes_per_code}


def query(cfg: PipelineConfig, where: dict, out) -> dict:
    from pipelines.query.run import QueryConfig, query_batch

    r = query_batch(where["model"], model_gallery(where, cfg.codes), where["dataset"], where["results"],
                    QueryConfig(top_k=cfg.top_k, split="query", rerank=cfg.rerank, refine=cfg.refine), out=out)
    return {"queries": r["queries"], "result_rows": r["result_rows"], "codes_per_s": round(r["codes_per_s"])}


def evaluate(cfg: PipelineConfig, where: dict, out) -> dict:
    from pipelines.evaluate import evaluation

    # the stage prints the evaluation's warnings on its own lines (and into Prefect's log), so
    # the evaluator's logger would only say them twice
    logger = logging.getLogger(evaluation.__name__)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        r = evaluation.evaluate_url(where["model"], where["dataset"], where["report"], "single",
                                    codes=cfg.codes)["result"]
    finally:
        logger.setLevel(level)
    q, f, spread = r["quantized"], r["float"], r.get("code_spread") or {}
    for warning in r.get("warnings", []):
        say("pipeline", f"[pipeline] {warning}", out)
    return {"map": q["map"], "p_at_5": q["precision_at"].get(5), "map_float": f["map"],
            "queries": q["queries"], "database": q["database"], "largest_bucket": spread.get("largest_bucket"),
            "codewords_used": spread.get("codewords_used_mean"), "report": where["report"]}


def view(cfg: PipelineConfig, where: dict, out) -> dict:
    from pipelines.view.page import write_viewer

    r = write_viewer(where["dataset"], where["results"], where["report"], where["viewer"],
                     max_queries=cfg.view_queries, top_k=cfg.view_top_k)
    return {"viewer": where["viewer"], "queries_shown": r.get("queries")}


# In order. The Prefect flow runs each of these as one task.
STAGES = [("prepare", prepare), ("train", train), ("encode", encode), ("query", query),
          ("evaluate", evaluate), ("view", view)]


def run_stage(name: str, fn, cfg: PipelineConfig, where: dict, out) -> dict:
    say("pipeline", f"[pipeline] stage {name} ...", out)
    t0 = time.monotonic()
    result = fn(cfg, where, out)
    result["seconds"] = round(time.monotonic() - t0, 1)
    say("pipeline", f"[pipeline] stage {name} done in {format_seconds(result['seconds'])}: "
        + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                    for k, v in result.items() if k != "seconds"), out)
    return result


def summary_line(results: dict, where: dict, seconds: float) -> str:
    p, t, e, v = results["prepare"], results["train"], results["encode"], results["evaluate"]
    return (f"[pipeline] done in {format_seconds(seconds)}: {p['photos']} photos -> {e['gallery_codes'] + v['queries']} "
            f"faces ({p['rejected']} rejected this run); OPQN {t['epochs']} epochs on {t['faces']} faces of "
            f"{t['identities']} identities; gallery {e['gallery_codes']} faces x {e['bytes_per_code']} bytes; "
            f"{v['queries']} queries: mAP {v['map']:.4f}, P@5 {v['p_at_5']:.4f} (float features mAP "
            f"{v['map_float']:.4f}); largest code bucket {v['largest_bucket']:.1%} of the gallery. "
            f"Report: {where['report']}/report.md  Viewer: {where['viewer']}")


def write_summary(cfg: PipelineConfig, where: dict, results: dict, seconds: float) -> dict:
    """``summary.json`` in the work folder (through storage: local or s3://), for scripts and
    dashboards: the settings, each stage's counts, metrics and time, and every output URL."""
    summary = {"source": cfg.source(), "workdir": cfg.workdir, "finished": datetime.now(timezone.utc).isoformat(
        timespec="seconds"), "seconds": round(seconds, 1), "urls": where, "stages": results, "config": asdict(cfg)}
    files.write_bytes_atomic(where["summary"], json.dumps(summary, indent=1, default=str).encode())
    return summary


def run_pipeline(cfg: PipelineConfig, out=None) -> dict:
    """Run every stage in order and write ``summary.json``; returns that summary (the settings,
    each stage's result, the stage URLs and the total seconds)."""
    out = out or sys.stderr
    where = stage_urls(cfg)
    check_inputs(cfg)  # before Ray starts: a typo costs a second, not a cluster start
    t0 = time.monotonic()
    say("pipeline", f"[pipeline] {cfg.source()} -> {cfg.workdir} ({len(STAGES)} stages: "
        f"{', '.join(n for n, _ in STAGES)})", out)
    from pipelines.execution import start_ray

    start_ray()  # one Ray for every stage (in-process, or the cluster of RAY_ADDRESS)
    results = {name: run_stage(name, fn, cfg, where, out) for name, fn in STAGES}
    seconds = time.monotonic() - t0
    say("pipeline", summary_line(results, where, seconds), out)
    return write_summary(cfg, where, results, seconds)
