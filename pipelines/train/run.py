"""Driver of a distributed training run: validate everything, then hand the loop to Ray Train.

Every check that can fail on bad input (dataset URL, identities, code shape) runs here,
before any worker starts, so a mistake costs seconds, not a cluster start-up.
"""
from __future__ import annotations

import math
import os
import tempfile
import uuid
from dataclasses import asdict, replace

import numpy as np
import ray
import ray.data
import ray.train
from ray.train.torch import TorchConfig, TorchTrainer

from pipelines.execution import start_ray
from pipelines.progress import say
from pipelines.formats.faces import arrow_filesystem, decode_batch, face_shard_files, read_face_columns
from pipelines.formats.checkpoint import load_checkpoint
from pipelines.train.config import RayTrainConfig
from pipelines.train.epoch_log import epoch_feed
from pipelines.train.worker import train_worker
from storage import urls

def training_identities(cfg: RayTrainConfig) -> tuple[list[str], list[str], int]:
    """Shard URLs, the sorted identity names (class index = position), and the row count."""
    if not cfg.dataset:
        raise ValueError("no dataset given: pass the face dataset URL written by `opqn prepare`")
    files = face_shard_files(cfg.dataset)
    table = read_face_columns(files, ("identity", "split"))
    splits = np.asarray(table.column("split").to_pylist(), dtype=object)
    keep = np.isin(splits, list(cfg.train_splits))
    identities = np.asarray(table.column("identity").to_pylist(), dtype=object)[keep]
    if not keep.any():
        raise ValueError(f"dataset {cfg.dataset} has no faces in splits {list(cfg.train_splits)} "
                         f"(found splits {sorted(set(splits.tolist()))})")
    classes = sorted(set(identities.tolist()))
    if len(classes) < 2:
        raise ValueError(f"dataset {cfg.dataset} has {len(classes)} identity in splits {list(cfg.train_splits)}: "
                         f"a classifier needs at least 2")
    return files, classes, int(keep.sum())


def _decode(batch: dict, label_of: dict, splits: list, stored_size: int, crop_fraction: float) -> dict:
    keep = np.isin(batch["split"], splits)
    images = [img for img, k in zip(batch["image"], keep) if k]
    return {"image": decode_batch(images, stored_size, crop_fraction),
            "label": np.array([label_of[i] for i in batch["identity"][keep]], dtype=np.int64)}


def build_dataset(cfg: RayTrainConfig, files: list[str], classes: list[str]) -> ray.data.Dataset:
    fs, _ = arrow_filesystem(files[0])
    paths = [arrow_filesystem(f)[1] for f in files]
    # one read task per shard, so a read task's memory is bounded by the shard, not the dataset
    ds = ray.data.read_parquet(paths, filesystem=fs, override_num_blocks=len(paths)).select_columns(
        ["image", "identity", "split"])
    ds = ds.randomize_block_order(seed=cfg.seed).map_batches(
        _decode, batch_format="numpy", batch_size=256,
        fn_kwargs={"label_of": {c: i for i, c in enumerate(classes)}, "splits": list(cfg.train_splits),
                   "stored_size": cfg.stored_size(), "crop_fraction": cfg.crop_fraction})
    return ds


def _storage_path(cfg: RayTrainConfig) -> str:
    if cfg.storage_path:
        return cfg.storage_path
    if "://" not in cfg.model_url or cfg.model_url.startswith("file://"):
        return os.path.join(os.path.dirname(os.path.abspath(cfg.model_url.removeprefix("file://"))), "ray-train")
    return os.path.join(tempfile.gettempdir(), "opqn-ray-train")


def train(cfg: RayTrainConfig, out=None) -> dict:
    """Run (or resume) distributed training; returns the final epoch record and the checkpoint URL."""
    if not cfg.model_url:
        raise ValueError("no model URL given: where should the checkpoint go?")
    if cfg.workers < 1:
        raise ValueError(f"workers must be >= 1, got {cfg.workers}")
    # Ray Train runs each worker in its own run folder, so a relative path would put the
    # checkpoint there (under /tmp/ray/...) instead of where the user asked.
    cfg = replace(cfg, **{k: urls.local_path(getattr(cfg, k)) for k in ("dataset", "model_url", "storage_path")
                          if getattr(cfg, k) and urls.is_local(getattr(cfg, k))})
    files, classes, rows = training_identities(cfg)
    opqn_config = cfg.opqn_config(len(classes))  # raises on K > D/M and other shape errors
    cfg = replace(cfg, run_id=cfg.run_id or uuid.uuid4().hex)
    # in-process Ray: the workers' CPUs plus one for Ray Data's read/decode tasks
    start_ray(num_cpus=max(os.cpu_count() or 1, int(math.ceil(cfg.workers * cfg.cpus_per_worker))) + 1)
    say("train", f"training OPQN-{opqn_config.variant} {opqn_config.bits:g} bit (M={opqn_config.M}, "
        f"K={opqn_config.K}, D={opqn_config.D}) on {rows} faces of {len(classes)} identities from {cfg.dataset}, "
        f"{cfg.workers} worker(s), {cfg.epochs} epochs -> {cfg.model_url}", out)
    # faces that fit in the workers' memory are decoded once by each worker and kept for every
    # epoch; a larger dataset streams through Ray Data (read + decode every epoch)
    in_memory = cfg.share_mb(rows) <= cfg.cache_mb
    say("train", f"data: each worker {'keeps its ~' if in_memory else 'streams its ~'}{cfg.share_mb(rows):.0f} MB "
        f"share of decoded faces {'in memory' if in_memory else f'(over --cache-mb {cfg.cache_mb})'}", out)
    per_worker, share = cfg.batch_size // cfg.workers, rows // cfg.workers
    if share < per_worker:
        say("train", f"note: {rows} training faces give each of {cfg.workers} workers ~{share}, less than a batch "
            f"of {per_worker}: each step takes a worker's whole share", out)
    with epoch_feed(cfg.epochs, cfg.model_url, out) as feed:  # the epoch lines: rank 0 -> this driver
        trainer = TorchTrainer(
            train_worker,
            train_loop_config={"config": asdict(cfg), "classes": classes, "network_config": opqn_config.to_dict(),
                               "in_memory": in_memory, "files": files, "rows": rows, "feed": feed},
            torch_config=TorchConfig(backend="nccl" if cfg.use_gpu else "gloo"),
            scaling_config=ray.train.ScalingConfig(num_workers=cfg.workers, use_gpu=cfg.use_gpu,
                                                   resources_per_worker={"CPU": cfg.cpus_per_worker},
                                                   placement_strategy="SPREAD"),
            run_config=ray.train.RunConfig(name=f"opqn-{cfg.run_id[:8]}", storage_path=_storage_path(cfg),
                                           failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures)),
            datasets={} if in_memory else {"train": build_dataset(cfg, files, classes)},
        )
        trainer.fit()
    state = load_checkpoint(cfg.model_url)
    last = state["history"][-1]
    say("train", f"done: {state['epoch']} epochs, loss {last['loss']:.4f}, acc {last['acc']:.3f}, "
        f"{len(state.get('nodes', []))} node(s), checkpoint {cfg.model_url}", out)
    return {"model_url": cfg.model_url, "epoch": state["epoch"], "history": state["history"],
            "nodes": state.get("nodes", []), "identities": len(classes), "faces": rows}
