"""The training function every Ray Train worker runs.

Each worker decodes its own share of the face dataset once (a seeded hash of the face id picks
the share, so the split does not depend on timing) and keeps it in memory for every epoch,
within ``cache_mb``; a share larger than that streams from Ray Data every epoch instead. The
epoch itself is ``pipelines.train.loop.train_epoch``, the loop the single-process trainer runs.

Rank 0 owns the checkpoint (model URL); every rank resumes from it, so after a worker
failure Ray Train restarts the group and training continues from the last finished epoch.
Loss parts are averaged across ranks and replicas are checked for drift every epoch. Workers
print nothing: rank 0 hands each epoch's record to the driver, which logs the line.
"""
from __future__ import annotations

import hashlib
import time

import numpy as np
import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from model.registry import build_network, with_loss
from pipelines.formats.faces import load_face_dataset
from pipelines.formats.checkpoint import checkpoint_exists, load_checkpoint, restore_training, save_checkpoint, training_state
from pipelines.train.config import RayTrainConfig
from pipelines.train.epoch_log import publish
from pipelines.train.loop import train_epoch
from pipelines.train.recipe import make_optimizer


TIMINGS = ("samples", "step_seconds", "data_seconds")


def allreduce_probe(model: torch.nn.Module, repeats: int = 3) -> float:
    """Seconds one all-reduce of every gradient takes (best of ``repeats``), for the time budget
    of an epoch; DDP overlaps it with backward in buckets, so it bounds the cost from above."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return 0.0
    grads = torch.zeros(sum(p.numel() for p in model.parameters() if p.requires_grad))
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        dist.all_reduce(grads)
        best = min(best, time.perf_counter() - t0)
    return best


def _all_reduce(values: list[float], op=None) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64)
    if dist.is_initialized():
        dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
    return t.tolist()


def _all_gather(obj) -> list:
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def parameter_checksum(model: torch.nn.Module) -> float:
    with torch.no_grad():
        return float(sum(p.double().sum() for p in model.parameters()))


def worker_share(face_ids: np.ndarray, rank: int, world: int, seed: int) -> np.ndarray:
    """Which faces this worker trains on: a seeded hash of the face id, modulo the worker count.

    Stable across runs and restarts and independent of shard order or read timing, and it
    mixes identities evenly across workers."""
    if world == 1:
        return np.ones(len(face_ids), dtype=bool)
    digest = [int.from_bytes(hashlib.blake2b(f"{seed}:{f}".encode(), digest_size=8).digest(), "little")
              for f in face_ids]
    return (np.asarray(digest, dtype=np.uint64) % np.uint64(world)) == rank


def _in_memory_share(cfg: RayTrainConfig, files: list[str], classes: list[str], rank: int, world: int,
                     threads: int) -> tuple[torch.Tensor, torch.Tensor]:
    faces = load_face_dataset(cfg.dataset, cfg.train_splits, cfg.stored_size(), cfg.crop_fraction, files=files,
                              select=lambda ids: worker_share(ids, rank, world, cfg.seed), threads=threads,
                              allow_empty=True)
    # face-id order: the same share in the same order however the shards are listed
    order = torch.from_numpy(np.argsort(np.asarray(faces.paths, dtype=object), kind="stable").astype(np.int64))
    label_of = {c: i for i, c in enumerate(classes)}
    labels = torch.tensor([label_of[c] for c in faces.labels], dtype=torch.int64)
    return faces.images[order], labels[order]


def _streamed_batches(shard, cfg: RayTrainConfig, per_worker: int, epoch: int, rank: int):
    for batch in shard.iter_torch_batches(batch_size=per_worker, drop_last=True,
                                          local_shuffle_buffer_size=cfg.shuffle_buffer or None,
                                          local_shuffle_seed=cfg.seed + epoch * 7919 + rank,
                                          dtypes={"image": torch.uint8, "label": torch.int64}, device="cpu"):
        yield batch["image"], batch["label"]


def train_worker(loop_config: dict) -> None:
    cfg = RayTrainConfig(**loop_config["config"])
    classes: list[str] = loop_config["classes"]
    feed = loop_config.get("feed")
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    threads = cfg.worker_threads()
    torch.set_num_threads(threads)
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    per_worker = max(2, cfg.batch_size // world)
    t_load = time.monotonic()
    if loop_config["in_memory"]:
        images, labels = _in_memory_share(cfg, loop_config["files"], classes, rank, world, threads)
        # every rank must take the same number of steps (DDP): the smallest share decides
        smallest = int(_all_reduce([len(labels)], dist.ReduceOp.MIN)[0])
        if smallest < 2:
            raise ValueError(f"a worker got {smallest} training faces: too few for {world} workers "
                             f"(use fewer --workers)")
        per_worker = min(per_worker, smallest)
        steps = max(1, smallest // per_worker)
    else:
        shard = ray.train.get_dataset_shard("train")
        # a batch is never larger than a worker's share (Ray Train splits the rows equally), so a
        # dataset smaller than a batch per worker still trains: one step of its whole share
        per_worker = max(1, min(per_worker, loop_config["rows"] // world))
        steps = max(1, loop_config["rows"] // world // per_worker)
    load_seconds = time.monotonic() - t_load
    model = build_network(cfg.variant, loop_config["network_config"])
    opt, sched = make_optimizer(model, cfg, steps)
    start_epoch, history = 0, []
    if checkpoint_exists(cfg.model_url):
        state = load_checkpoint(cfg.model_url)
        if cfg.resume or state.get("run_id") == cfg.run_id:
            state = restore_training(cfg.model_url, model, opt, sched, classes)
            start_epoch, history = state["epoch"], state["history"]
            if rank == 0:
                publish(feed, "resume", start_epoch)
    nodes = _all_gather(ray.get_runtime_context().get_node_id())
    trainable = ray.train.torch.prepare_model(with_loss(model))
    device = ray.train.torch.get_device()
    allreduce_seconds = allreduce_probe(model)

    # An epoch's time runs from the end of the previous epoch's SGD steps (so it holds that
    # epoch's all-reduce of losses, checkpoint and barrier) to the end of its own steps: in a
    # steady state, epochs laid end to end add up to the run.
    period_start = time.monotonic()
    for epoch in range(start_epoch, cfg.epochs):
        gen = torch.Generator().manual_seed(cfg.seed * 100003 + epoch * 101 + rank)
        if loop_config["in_memory"]:
            means, _ = train_epoch(trainable, opt, sched, images, labels, cfg, gen, batch_size=per_worker,
                                   steps=steps, device=device)
        else:
            means, _ = train_epoch(trainable, opt, sched, None, None, cfg, gen, steps=steps, device=device,
                                   stream=_streamed_batches(shard, cfg, per_worker, epoch, rank))
        elapsed, period_start = time.monotonic() - period_start, time.monotonic()
        parts = sorted(k for k in means if k not in TIMINGS)
        seen = means["samples"]
        totals = _all_reduce([means[k] * seen for k in parts] + [seen])
        slowest = _all_reduce([elapsed, means["step_seconds"], means["data_seconds"]], dist.ReduceOp.MAX)
        global_seen = totals[len(parts)]
        if global_seen == 0:
            raise ValueError(f"epoch {epoch + 1}: no training batch reached the workers "
                             f"(dataset smaller than one batch of {per_worker} per worker?)")
        checksums = _all_gather(parameter_checksum(model))
        record = {"epoch": epoch + 1, "lr": opt.param_groups[0]["lr"],
                  **{k: totals[i] / global_seen for i, k in enumerate(parts)},
                  "samples": int(global_seen), "samples_per_s": global_seen / max(slowest[0], 1e-9),
                  "epoch_seconds": slowest[0], "step_seconds": slowest[1], "data_seconds": slowest[2],
                  "allreduce_seconds": allreduce_seconds * steps,
                  "load_seconds": load_seconds if epoch == start_epoch else 0.0,
                  "replica_spread": max(checksums) - min(checksums)}
        history.append(record)
        if rank == 0:
            save_checkpoint(cfg.model_url, training_state(
                model, opt, sched, epoch=epoch + 1, history=history, classes=classes,
                train=loop_config["config"], run_id=cfg.run_id, nodes=sorted(set(nodes)), workers=world))
            publish(feed, "epoch", record)  # the driver's line for it (train/epoch_log.py)
        if dist.is_initialized():
            dist.barrier()  # nobody starts the next epoch before the checkpoint of this one exists
        ray.train.report({**record, "nodes": len(set(nodes))})
