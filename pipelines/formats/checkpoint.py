"""The checkpoint format: one torch-serialised dict on any storage URL, loaded without pickle.

A checkpoint holds everything needed to resume (model incl. F and W, optimizer, scheduler,
epoch, RNG state, history) and to use the model elsewhere (the method, its network config
with D, M, K, the identity names behind the class indices, the training settings). Only
tensors, numbers, strings, lists and dicts go in, so ``torch.load(weights_only=True)`` reads
it back. Any registered method (``model.registry``: OPQN and its ablations, DPQ, DCDH) is
stored the same way and rebuilt by ``model_from_checkpoint``.

This module also owns the stored image size: faces are decoded at ``enlarge`` x the network
input (training crops ``image_size`` at random from them, everyone else takes the centre crop),
so encoding, querying and evaluation size faces exactly as the checkpoint's training did.
"""
from __future__ import annotations

import hashlib
import io

import torch

from model.registry import Method, get_method, method_of
from storage import checkpoints, files

FORMAT = "opqn-checkpoint/1"
MODEL_ID_CHARS = 16  # model_id: the first hex digits of the checkpoint file's sha256
DEFAULT_ENLARGE = 1.1  # stored face side / network input side, when training did not say


def stored_image_size(image_size: int, enlarge: float = DEFAULT_ENLARGE) -> int:
    """Side of a decoded face before the crop to ``image_size``."""
    return max(image_size, int(round(image_size * enlarge)))


def stored_size(state: dict) -> int:
    """``stored_image_size`` of a loaded checkpoint: its network input and training enlargement."""
    enlarge = (state.get("train") or {}).get("enlarge", DEFAULT_ENLARGE)
    return stored_image_size(int(state["config"]["image_size"]), float(enlarge))


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


def checkpoint_model_id(url: str, storage_options: dict | None = None) -> str:
    """The ``model_id`` ``load_checkpoint`` gives, hashed while streaming the file: for callers
    that only need the identity, without deserialising the weights."""
    return files.stat(url, storage_options)[1][:MODEL_ID_CHARS]


def checkpoint_exists(url: str, storage_options: dict | None = None) -> bool:
    return checkpoints.exists(url, storage_options)


def checkpoint_method(state: dict) -> Method:
    """The method a loaded checkpoint holds (checkpoints without one are OPQN, by variant)."""
    return get_method(state.get("method") or (state.get("config") or {}).get("variant") or "opqn")


def require_opqn(state: dict, url: str) -> dict:
    """Refuse the evaluation baselines' checkpoints where an OPQN model (any variant) is needed.

    DPQ and DCDH checkpoints (``opqn evaluate``, ``benchmarks/paper_tables.py``) load like any
    other but hold another network, which galleries and queries cannot use.
    """
    method = state.get("method", "opqn")
    if checkpoint_method(state).family != "opqn":
        raise ValueError(f"{url} is a {method.upper()} checkpoint, an evaluation baseline; galleries and "
                         f"queries need an OPQN checkpoint (`opqn train` or the train-opqn flow, any --variant)")
    return state


def model_from_checkpoint(state: dict, expect_method: str | None = None) -> torch.nn.Module:
    """Rebuild the network of a loaded checkpoint, of whichever method, in eval mode.

    The weights must match the shapes the stored config implies: a checkpoint whose (D, M, K)
    or code length disagrees with its tensors is an error that names both.
    """
    method = checkpoint_method(state)
    if expect_method and expect_method != method.name:
        raise ValueError(f"the checkpoint holds method {method.name!r}, not {expect_method!r}")
    cfg = method.config_class.from_dict(dict(state.get("config") or {}))
    model = method.model_class(cfg)
    expected = model.state_dict()
    weights = state.get("model") or {}
    missing = sorted(set(expected) - set(weights))
    wrong = [(k, tuple(weights[k].shape), tuple(v.shape)) for k, v in expected.items()
             if k in weights and tuple(weights[k].shape) != tuple(v.shape)]
    if missing or wrong:
        shape = (f"D={cfg.D}, M={cfg.M}, K={cfg.K}" if hasattr(cfg, "M") else f"D={cfg.D}, bits={cfg.bits}")
        detail = "; ".join(f"{k}: checkpoint {a} vs config {b}" for k, a, b in wrong[:4])
        if missing:
            detail += f"{'; ' if detail else ''}missing tensors {missing[:4]}"
        raise ValueError(f"checkpoint weights do not match its {method.label} config ({shape}): {detail}")
    model.load_state_dict(weights)
    return model.eval()


def training_state(model: torch.nn.Module, optimizer, scheduler, *, epoch: int, history: list,
                   classes: list[str], train: dict, **extra) -> dict:
    """What every trainer checkpoints after every epoch."""
    return {"method": method_of(model).name, "config": model.cfg.to_dict(), "train": train, "classes": classes,
            "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "epoch": epoch, "history": history, **extra}


def restore_training(url: str, model: torch.nn.Module, optimizer, scheduler, classes: list[str]) -> dict:
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
