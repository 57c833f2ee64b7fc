"""OPQN checkpoints: one torch-serialised dict on any storage URL, loaded without pickle.

A checkpoint holds everything needed to resume (model incl. F and W, optimizer, scheduler,
epoch, RNG state, history) and to use the model elsewhere (config with D, M, K, the identity
names behind the class indices). Only tensors, numbers, strings, lists and dicts go in, so
``torch.load(weights_only=True)`` reads it back.
"""
from __future__ import annotations

import hashlib
import io

import torch

from model.opqn import OPQN, OPQNConfig
from storage import checkpoints, files

FORMAT = "opqn-checkpoint/1"
MODEL_ID_CHARS = 16  # model_id: the first hex digits of the checkpoint file's sha256


def save_checkpoint(url: str, state: dict, storage_options: dict | None = None) -> None:
    buffer = io.BytesIO()
    torch.save({"format": FORMAT, **state}, buffer)
    checkpoints.write_bytes(url, buffer.getvalue(), storage_options)


def load_checkpoint(url: str, storage_options: dict | None = None) -> dict:
    data = checkpoints.read_bytes(url, storage_options)
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for corrupt or foreign files
        raise ValueError(f"{url} is not a readable OPQN checkpoint: {exc}") from exc
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"{url} is not an OPQN checkpoint (format {state.get('format') if isinstance(state, dict) else type(state).__name__!r}, expected {FORMAT!r})")
    state["model_id"] = hashlib.sha256(data).hexdigest()[:MODEL_ID_CHARS]
    return state


def require_opqn(state: dict, url: str) -> dict:
    """Refuse the evaluation baselines' checkpoints where an OPQN model (any variant) is needed.

    DPQ and DCDH checkpoints (``opqn evaluate``, ``benchmarks/paper_tables.py``) load like any
    other but hold another network; galleries and queries used to fail on them deep in an
    encoder actor, with "unknown OPQN config keys".
    """
    from pipelines.evaluate.methods import METHODS  # here: that module imports this one

    method = state.get("method", "opqn")
    if method in METHODS and METHODS[method].family != "opqn":
        raise ValueError(f"{url} is a {method.upper()} checkpoint, an evaluation baseline; galleries and "
                         f"queries need an OPQN checkpoint (`opqn train` or the train-opqn flow, any --variant)")
    return state


def checkpoint_model_id(url: str, storage_options: dict | None = None) -> str:
    """The ``model_id`` ``load_checkpoint`` gives, hashed while streaming the file: for callers
    that only need the identity, without deserialising the weights."""
    return files.stat(url, storage_options)[1][:MODEL_ID_CHARS]


def model_from_checkpoint(state: dict) -> OPQN:
    """Rebuild the network from a loaded checkpoint, in eval mode."""
    cfg = OPQNConfig.from_dict(state["config"])
    model = OPQN(cfg)
    model.load_state_dict(state["model"])
    return model.eval()


def checkpoint_exists(url: str, storage_options: dict | None = None) -> bool:
    return checkpoints.exists(url, storage_options)


def training_state(model: OPQN, optimizer, scheduler, *, epoch: int, history: list, classes: list[str],
                   train: dict, **extra) -> dict:
    """What both trainers checkpoint after every epoch."""
    return {"config": model.cfg.to_dict(), "train": train, "classes": classes, "model": model.state_dict(),
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "epoch": epoch,
            "history": history, **extra}


def restore_training(url: str, model: OPQN, optimizer, scheduler, classes: list[str]) -> dict:
    """Load ``url`` into model/optimizer/scheduler if it was trained with the same config and
    identities; refuse otherwise (resuming onto another setup would silently mix runs)."""
    state = load_checkpoint(url)
    if state["config"] != model.cfg.to_dict() or state["classes"] != classes:
        raise ValueError(f"checkpoint {url} was trained with another configuration or identities; "
                         f"use a new model URL or --no-resume")
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    # progress from the checkpoint, plan from this run: a one-cycle schedule resumed towards more
    # epochs follows the new run's cycle instead of stopping at the old run's last step
    saved = state["scheduler"]
    plan = scheduler.state_dict()
    scheduler.load_state_dict({**plan, **{k: saved[k] for k in ("last_epoch", "_step_count", "_last_lr") if k in saved}})
    return state
