"""The one training loop: augmentation, batches, SGD steps and epochs over faces held in memory.

The single-process trainer, every Ray Train worker and the method comparison run exactly this
code, so a recipe measured with one trainer is the recipe the others train with. Faces arrive
as uint8 tensors (N, 3, E, E) stored at ``enlarge`` x the network input; augmentation works on
whole batches of tensors (no per-image Python loop), and the learning-rate schedule advances
per optimizer step, so a schedule means the same thing at any batch size or worker count.
"""
from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F

from model.features import to_unit_range

# Augmentations a recipe can name (``Recipe.augment``, comma-separated). "crop" and "flip" are
# the paper's; the photometric ones make codes hold on photos taken in other conditions.
AUGMENTATIONS = ("crop", "flip", "light", "grey", "blur")


def parse_augment(spec: str) -> frozenset[str]:
    names = frozenset(s.strip() for s in spec.split(",") if s.strip())
    unknown = sorted(names - set(AUGMENTATIONS))
    if unknown:
        raise ValueError(f"unknown augmentation(s) {unknown} in {spec!r}; choose from {list(AUGMENTATIONS)}")
    return names


def _crop_flip(images: torch.Tensor, size: int, generator: torch.Generator, crop: bool, flip: bool) -> torch.Tensor:
    """Per-image random crop offset and horizontal flip, gathered for the whole batch at once."""
    n, e = images.shape[0], images.shape[-1]
    if crop:
        offsets = torch.randint(0, e - size + 1, (n, 2), generator=generator)
    else:
        offsets = torch.full((n, 2), (e - size) // 2, dtype=torch.long)
    flips = torch.rand(n, generator=generator) < 0.5 if flip else torch.zeros(n, dtype=torch.bool)
    step = torch.arange(size)
    rows = offsets[:, :1] + step  # (n, size)
    cols = torch.where(flips[:, None], offsets[:, 1:] + size - 1 - step, offsets[:, 1:] + step)
    # gather each image's rows, then its (possibly reversed) columns
    out = images.gather(2, rows[:, None, :, None].expand(n, images.shape[1], size, e))
    return out.gather(3, cols[:, None, None, :].expand(n, images.shape[1], size, size))


def _photometric(x: torch.Tensor, generator: torch.Generator, names: frozenset[str]) -> torch.Tensor:
    """Lighting, grey and blur on float pixels in [0, 255]: each image draws its own change.

    "light": brightness and contrast scaled by U(0.6, 1.4), per-channel colour gain U(0.85,
    1.15), and half of the images lit from one side (a horizontal ramp that darkens one half
    by up to 60 %): studio side light and dim snapshots are what moved unseen faces onto a
    few codes. "grey": a fifth of the images in luminance only. "blur": a tenth blurred 3x3.
    """
    n, c, h, w = x.shape
    rand = lambda *shape: torch.rand(*shape, generator=generator)  # noqa: E731
    if "light" in names:
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        contrast = 0.6 + 0.8 * rand(n, 1, 1, 1)
        brightness = 0.6 + 0.8 * rand(n, 1, 1, 1)
        gain = 0.85 + 0.3 * rand(n, c, 1, 1) if c == 3 else 1.0
        x = ((x - mean) * contrast + mean) * brightness * gain
        side = (rand(n, 1, 1, 1) < 0.5) * 0.6 * rand(n, 1, 1, 1)  # strength of one-sided light
        sign = torch.where(rand(n, 1, 1, 1) < 0.5, -1.0, 1.0)
        ramp = torch.linspace(-1.0, 1.0, w).view(1, 1, 1, w) * sign
        x = x * (1.0 - side * (1.0 + ramp) / 2.0)
    if "grey" in names and c == 3:
        grey = rand(n) < 0.2
        if grey.any():
            lum = (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)
            x = torch.where(grey[:, None, None, None], lum.expand_as(x), x)
    if "blur" in names:
        blur = rand(n) < 0.1
        if blur.any():
            k = torch.tensor([1.0, 2.0, 1.0])
            kernel = (k[:, None] * k[None, :] / 16.0).expand(c, 1, 3, 3)
            blurred = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), kernel, groups=c)
            x = torch.where(blur[:, None, None, None], blurred, x)
    return x.clamp(0.0, 255.0)


def augment(images: torch.Tensor, size: int, generator: torch.Generator,
            names: frozenset[str] | str = frozenset({"crop", "flip"})) -> torch.Tensor:
    """A training batch: uint8 (N, C, E, E) faces -> float (N, C, size, size) in [-1, 1]."""
    names = parse_augment(names) if isinstance(names, str) else names
    x = _crop_flip(images, size, generator, "crop" in names, "flip" in names).float()
    if names & {"light", "grey", "blur"}:
        x = _photometric(x, generator, names)
    return to_unit_range(x)


def batches(n: int, batch_size: int, generator: torch.Generator, steps: int = 0) -> list[torch.Tensor]:
    """A shuffled epoch of full batches (BatchNorm needs > 1 sample; a partial last batch is
    dropped). A set smaller than one batch is one batch. ``steps`` > 0 caps the epoch at that
    many batches: Ray workers whose shares differ by a few faces must all step equally often."""
    perm = torch.randperm(n, generator=generator)
    out = [perm] if n <= batch_size else [perm[i:i + batch_size] for i in range(0, n - batch_size + 1, batch_size)]
    return out[:steps] if steps else out


def steps_per_epoch(n: int, batch_size: int) -> int:
    return max(1, n // batch_size)


def train_step(module: torch.nn.Module, optimizer, scheduler, images: torch.Tensor,
               labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """One SGD step of a network-with-loss module (plain or DDP-wrapped); the loss parts, detached.

    A non-finite loss raises before the step is applied, so a diverged run never writes its
    weights over the last good checkpoint.
    """
    module.train()
    parts = module(images, labels)
    if not torch.isfinite(parts["loss"]):
        raise FloatingPointError(f"training diverged: loss is {float(parts['loss'])} "
                                 f"(lower --lr or check the data); the last checkpoint is kept")
    optimizer.zero_grad(set_to_none=True)
    parts["loss"].backward()
    optimizer.step()
    if scheduler is not None and scheduler.last_epoch < getattr(scheduler, "total_steps", math.inf):
        scheduler.step()
    return {k: v.detach() for k, v in parts.items()}


def train_epoch(trainable: torch.nn.Module, optimizer, scheduler, images: torch.Tensor | None,
                labels: torch.Tensor | None, recipe, generator: torch.Generator, *, batch_size: int = 0,
                steps: int = 0, step_budget: int = 0, device: torch.device | None = None,
                stream=None) -> tuple[dict[str, float], int]:
    """One epoch: the sample-weighted mean of each loss part, ``samples``, ``step_seconds`` (time
    in the SGD steps: forward, backward with DDP's all-reduce, update), ``data_seconds`` (taking
    and augmenting batches) and the steps taken.

    Batches are drawn from the in-memory ``images``/``labels`` (shuffled with ``generator``),
    or taken from ``stream`` (an iterator of uint8 image and label batches) when faces do not
    fit in memory. ``steps`` caps the epoch (equal steps on every Ray worker); ``step_budget``
    stops a smoke run early.
    """
    names = parse_augment(recipe.augment)
    if stream is None:
        stream = ((images[idx], labels[idx])
                  for idx in batches(len(images), batch_size or recipe.batch_size, generator, steps))
    sums: dict[str, torch.Tensor] = {}
    seen = taken = 0
    step_seconds = data_seconds = 0.0
    t0 = time.perf_counter()
    for raw, y in stream:
        x = augment(raw, recipe.image_size, generator, names)
        if device is not None:
            x, y = x.to(device), y.to(device)
        t1 = time.perf_counter()
        parts = train_step(trainable, optimizer, scheduler, x, y)
        t2 = time.perf_counter()
        data_seconds += t1 - t0
        step_seconds += t2 - t1
        for k, v in parts.items():
            sums[k] = sums.get(k, 0.0) + v.float().cpu() * len(y)
        seen += len(y)
        taken += 1
        if (step_budget and taken >= step_budget) or (steps and taken >= steps):
            break
        t0 = time.perf_counter()
    return {**{k: float(v) / max(seen, 1) for k, v in sums.items()}, "samples": seen,
            "step_seconds": step_seconds, "data_seconds": data_seconds}, taken
