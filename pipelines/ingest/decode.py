"""Photo bytes -> RGB image, or a reason why not.

Photos in the wild are messy: CMYK and greyscale JPEGs, PNGs with alpha, EXIF rotation,
files with the wrong extension, truncated downloads, decompression bombs. The format is taken
from the bytes, never the file name. The full-resolution image is kept for cropping; a
downscaled copy is what the detector sees, because MTCNN's cost grows with the pixel count
while faces worth keeping are large enough to survive the shrink.
"""
from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# Reject reasons: short stable codes (the summary line counts them). Details go in `detail`.
EMPTY = "empty_file"
UNREADABLE = "unreadable"
NOT_AN_IMAGE = "not_an_image"
CORRUPT = "corrupt_image"
TOO_LARGE = "too_large"
TOO_SMALL = "too_small"
NO_FACE = "no_face"
DUPLICATE = "duplicate"
TOO_FEW_PHOTOS = "too_few_photos"


class Rejected(Exception):
    """A photo that cannot become a face row; ``reason`` is one of the codes above."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.detail = reason, detail


@dataclass
class Decoded:
    image: Image.Image  # full-resolution RGB, EXIF orientation applied
    detect: np.ndarray  # (h, w, 3) uint8, at most max_side on the longer side
    scale: float  # detect coordinates * scale = image coordinates


def decode(data: bytes, max_side: int = 1280, max_pixels: int = 120_000_000, min_side: int = 24) -> Decoded:
    """Decode ``data`` to RGB; raise :class:`Rejected` with the reason when it cannot be used."""
    if not data:
        raise Rejected(EMPTY, "zero bytes")
    try:
        with warnings.catch_warnings():
            # our own max_pixels check below decides; PIL still refuses > 2x its limit on open
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
            w, h = im.size
            if w * h > max_pixels:
                raise Rejected(TOO_LARGE, f"{w}x{h} pixels is over the limit of {max_pixels}")
            im.load()
    except Rejected:
        raise
    except UnidentifiedImageError as exc:
        raise Rejected(NOT_AN_IMAGE, str(exc)) from None
    except Image.DecompressionBombError as exc:
        raise Rejected(TOO_LARGE, str(exc)) from None
    except (OSError, SyntaxError, ValueError) as exc:  # truncated / corrupt streams
        raise Rejected(CORRUPT, f"{type(exc).__name__}: {exc}") from None
    try:
        im = ImageOps.exif_transpose(im)
    except Exception:  # a broken EXIF block should not cost the photo
        pass
    im = to_rgb(im)
    w, h = im.size
    if min(w, h) < min_side:
        raise Rejected(TOO_SMALL, f"{w}x{h} is smaller than {min_side} pixels on a side")
    scale = 1.0
    small = im
    if max(w, h) > max_side:
        scale = max(w, h) / max_side
        small = im.resize((max(1, round(w / scale)), max(1, round(h / scale))), Image.Resampling.BILINEAR, reducing_gap=2.0)
        scale = w / small.size[0]
    return Decoded(image=im, detect=np.asarray(small, dtype=np.uint8), scale=scale)


def to_rgb(im: Image.Image) -> Image.Image:
    """RGB from any mode; transparent pixels become white (the usual background of cut-outs)."""
    if im.mode == "RGB":
        return im
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(im, dtype=np.float64)
        top = arr.max() or 1.0
        im = Image.fromarray((arr * (255.0 / top)).astype(np.uint8))
    return im.convert("RGB")
