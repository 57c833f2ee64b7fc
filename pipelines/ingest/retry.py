"""Second looks for photos whose first detector pass kept no face: the photo centred on a
larger canvas, then the same with its luminance histogram equalised.

Why a canvas: MTCNN's later stages (R-Net, O-Net) judge each candidate box on a crop clipped
to the image. When the face fills the frame (tight studio crops, portraits cut to the face) the
box reaches past the border, the clipped crop is squashed, and the face is thrown away. On a
canvas padded with the photo's mean colour the whole box fits. Why equalise: hard one-sided
light and flat grey photos leave too little contrast for the proposals; equalising the
luminance restores it. The retries run only for photos whose first pass kept nothing, so a
photo that gives a face at once is processed exactly as before. Measured in
``benchmarks/hard_photos.py`` (docs/results.md, "Detection on hard photos").

Boxes and landmarks found on a canvas are mapped back to the photo's own pixels; the crop is
then taken from the original photo, with the canvas fill outside its borders.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
from PIL import Image, ImageOps

from .mtcnn import Detections

PAD = 1.75  # canvas side / photo side: room for a box that reaches past the photo's border
LOOKS = ("canvas", "canvas_equalised")  # tried in this order, each only for photos still without a face


@dataclass(frozen=True)
class Found:
    """One photo's detections in its own pixel coordinates, and how they were found.

    ``fill`` is the canvas colour when a retry found them (the aligned crop uses it outside
    the photo), ``None`` for the first pass."""

    detections: Detections
    look: str = "plain"
    fill: tuple[int, int, int] | None = None


def mean_colour(image: np.ndarray) -> tuple[int, int, int]:
    return tuple(int(round(v)) for v in image.reshape(-1, 3).mean(0))


def equalised(image: np.ndarray) -> np.ndarray:
    """The photo with its luminance histogram equalised and its colour kept (YCbCr)."""
    y, cb, cr = Image.fromarray(image).convert("YCbCr").split()
    return np.asarray(Image.merge("YCbCr", (ImageOps.equalize(y), cb, cr)).convert("RGB"))


def canvas(image: np.ndarray, fill: tuple[int, int, int], pad: float = PAD,
           max_side: int | None = None) -> tuple[np.ndarray, tuple[float, float], float]:
    """``image`` centred on a ``pad`` times larger canvas of colour ``fill``, shrunk to fit
    ``max_side``; returns ``(canvas, offset, scale)`` with canvas pixel = (photo pixel + offset) * scale."""
    h, w = image.shape[:2]
    big_h, big_w = int(round(h * pad)), int(round(w * pad))
    oy, ox = (big_h - h) // 2, (big_w - w) // 2
    out = np.empty((big_h, big_w, 3), dtype=np.uint8)
    out[:] = np.asarray(fill, dtype=np.uint8)
    out[oy:oy + h, ox:ox + w] = image
    scale = 1.0
    if max_side and max(big_h, big_w) > max_side:
        small = Image.fromarray(out)
        scale = max_side / max(big_h, big_w)
        small = small.resize((max(1, round(big_w * scale)), max(1, round(big_h * scale))), Image.Resampling.BILINEAR)
        scale = small.size[0] / big_w
        out = np.asarray(small)
    return out, (float(ox), float(oy)), scale


def to_photo(det: Detections, offset: tuple[float, float], scale: float) -> Detections:
    """Detections on a canvas, in the photo's pixel coordinates (the inverse of ``canvas``)."""
    shift = np.asarray(offset, dtype=np.float32)
    boxes = det.boxes / np.float32(scale) - np.tile(shift, 2)
    points = det.landmarks / np.float32(scale) - shift
    return Detections(boxes.astype(np.float32), det.scores.copy(), points.astype(np.float32))


def look(image: np.ndarray, name: str, max_side: int | None) -> tuple[np.ndarray, tuple[float, float], float]:
    """The detector input of retry ``name`` for one photo, with its offset and scale."""
    source = equalised(image) if name == "canvas_equalised" else image
    return canvas(source, mean_colour(source), PAD, max_side)


def detect(detector, images: list[np.ndarray], keeps: Callable[[Detections, np.ndarray], bool],
           max_side: int | None = None) -> list[Found]:
    """Detections for every image: the first pass, then the ``LOOKS`` in turn for the images
    where ``keeps(detections, image)`` is still false (each look one batched detector call)."""
    found = [Found(d) for d in detector.detect(images)] if images else []
    todo = [i for i, f in enumerate(found) if not keeps(f.detections, images[i])]
    for name in LOOKS:
        if not todo:
            break
        inputs = [look(images[i], name, max_side) for i in todo]
        retried = detector.detect([c for c, _, _ in inputs])
        still = []
        for i, (_, offset, scale), det in zip(todo, inputs, retried):
            det = to_photo(det, offset, scale)
            if keeps(det, images[i]):
                found[i] = Found(det, name, mean_colour(images[i]))
            else:
                still.append(i)
        todo = still
    return found
