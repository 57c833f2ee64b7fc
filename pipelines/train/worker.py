"""The training function every Ray Train worker runs.

Rank 0 owns the checkpoint (model URL); every rank resumes from it, so after a worker
failure Ray Train restarts the group and training continues from the last finished epoch.
Loss parts are averaged across ranks and replicas are checked for drift every epoch.
"""
from __future__ import annotations

import sys
import time

import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from model.losses import OPQNWithLoss
from model.opqn import OPQN, OPQNConfig
from pipelines.checkpoint import checkpoint_exists, load_checkpoint, restore_training, save_checkpoint, training_state
from pipelines.recipe import make_optimizer
from pipelines.train.config import RayTrainConfig
from pipelines.train_local import augment, train_step

PARTS = ("loss", "clf", "clf_x", "clf_s", "entropy", "acc")


def _all_reduce(values: list[float]) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64)
    if dist.is_initialized():
        dist.all_reduce(t)
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


def train_worker(loop_config: dict) -> None:
    cfg = RayTrainConfig(**loop_config["config"])
    classes: list[str] = loop_config["classes"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(max(1, cfg.threads_per_worker))
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    model = OPQN(OPQNConfig.from_dict(loop_config["opqn_config"]))
    opt, sched = make_optimizer(model, cfg)
    start_epoch, history = 0, []
    if checkpoint_exists(cfg.model_url):
        state = load_checkpoint(cfg.model_url)
        if cfg.resume or state.get("run_id") == cfg.run_id:
            state = restore_training(cfg.model_url, model, opt, sched, classes)
            start_epoch, history = state["epoch"], state["history"]
            if rank == 0:
                print(f"resuming {cfg.model_url} at epoch {start_epoch}/{cfg.epochs}", flush=True)
    nodes = _all_gather(ray.get_runtime_context().get_node_id())
    trainable = ray.train.torch.prepare_model(OPQNWithLoss(model))
    device = ray.train.torch.get_device()
    shard = ray.train.get_dataset_shard("train")
    per_worker = max(2, cfg.batch_size // world)
    size = model.cfg.image_size

    for epoch in range(start_epoch, cfg.epochs):
        gen = torch.Generator().manual_seed(cfg.seed * 100003 + epoch * 101 + rank)
        sums, seen, t0 = [0.0] * len(PARTS), 0, time.monotonic()
        for batch in shard.iter_torch_batches(batch_size=per_worker, drop_last=True,
                                              local_shuffle_buffer_size=cfg.shuffle_buffer or None,
                                              local_shuffle_seed=cfg.seed + epoch * 7919 + rank,
                                              dtypes={"image": torch.uint8, "label": torch.int64},
                                              device="cpu"):
            images = augment(batch["image"], size, gen).to(device)
            labels = batch["label"].to(device)
            parts = train_step(trainable, opt, images, labels)
            n = len(labels)
            sums = [s + parts[k] * n for s, k in zip(sums, PARTS)]
            seen += n
        sched.step()
        elapsed = time.monotonic() - t0
        totals = _all_reduce(sums + [seen, seen / max(elapsed, 1e-9)])
        global_seen = totals[len(PARTS)]
        if global_seen == 0:
            raise ValueError(f"epoch {epoch + 1}: no training batch reached the workers "
                             f"(dataset smaller than one batch of {per_worker} per worker?)")
        checksums = _all_gather(parameter_checksum(model))
        record = {"epoch": epoch + 1, "lr": opt.param_groups[0]["lr"],
                  **{k: totals[i] / global_seen for i, k in enumerate(PARTS)},
                  "samples": int(global_seen), "samples_per_s": totals[-1],
                  "replica_spread": max(checksums) - min(checksums)}
        history.append(record)
        if rank == 0:
            save_checkpoint(cfg.model_url, training_state(
                model, opt, sched, epoch=epoch + 1, history=history, classes=classes,
                train=loop_config["config"], run_id=cfg.run_id, nodes=sorted(set(nodes)), workers=world))
            print("[train] epoch {epoch}/{total} loss {loss:.4f} clf_x {clf_x:.4f} clf_s {clf_s:.4f} "
                  "entropy {entropy:.4f} acc {acc:.3f} {samples_per_s:.1f} samples/s".format(total=cfg.epochs, **record),
                  file=sys.stderr, flush=True)
        if dist.is_initialized():
            dist.barrier()  # nobody starts the next epoch before the checkpoint of this one exists
        ray.train.report({**record, "nodes": len(set(nodes))})
