"""Five-point face alignment: a similarity transform onto a canonical template, then one warp.

Why a similarity (rotation + uniform scale + shift) and not a full affine: it keeps the face's
proportions, so identity cues survive; the 5 MTCNN landmarks pin it down by least squares
(Umeyama 1991). The template is the ArcFace / InsightFace 112x112 one, scaled to the crop
size, which is what OPQN-style face models are trained on.
"""
from __future__ import annotations

import numpy as np
from PIL import Image

# InsightFace arcface_dst for a 112x112 crop: left eye, right eye, nose tip, mouth left, mouth right.
ARCFACE_112 = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]],
    dtype=np.float64,
)


def template(size: int) -> np.ndarray:
    """The 5-point template for a ``size`` x ``size`` crop."""
    return ARCFACE_112 * (size / 112.0)


def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """2x3 matrix M with ``dst ~= M @ [src, 1]``, least squares over rotation, scale and shift (Umeyama)."""
    src = np.asarray(src, dtype=np.float64).reshape(-1, 2)
    dst = np.asarray(dst, dtype=np.float64).reshape(-1, 2)
    mu_s, mu_d = src.mean(0), dst.mean(0)
    s_c, d_c = src - mu_s, dst - mu_d
    var_s = (s_c ** 2).sum() / len(src)
    if var_s <= 1e-12:
        raise ValueError("landmarks are degenerate (all at one point)")
    cov = d_c.T @ s_c / len(src)
    u, sig, vt = np.linalg.svd(cov)
    d = np.ones(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        d[1] = -1
    rot = u @ np.diag(d) @ vt
    scale = (sig * d).sum() / var_s
    m = np.zeros((2, 3))
    m[:, :2] = scale * rot
    m[:, 2] = mu_d - scale * rot @ mu_s
    return m


def warp_face(image: Image.Image, landmarks: np.ndarray, size: int,
              fill: tuple[int, int, int] | None = None) -> Image.Image:
    """Aligned ``size`` x ``size`` RGB crop of ``image`` (full resolution) given its 5 landmarks.

    When the face is much larger than the crop, the face region is first shrunk with a box
    filter so the final bilinear warp does not alias (a 600-pixel face into 32 pixels).
    Outside the photo the crop is black, or ``fill`` (the canvas colour a face was found on).
    """
    # PIL samples in continuous coordinates (pixel i spans [i, i+1)); landmarks and the
    # template are pixel indices (centre at i), hence the half-pixel shifts.
    m = similarity_transform(np.asarray(landmarks, dtype=np.float64) + 0.5, template(size) + 0.5)
    scale = float(np.sqrt(abs(np.linalg.det(m[:, :2]))))  # output pixels per input pixel
    inv = _invert(m)
    factor = int(1.0 / scale) if scale < 0.5 else 1
    if factor > 1:
        # Region of the input that the output square maps from, with a margin, then shrunk.
        corners = np.array([[0, 0, 1], [size, 0, 1], [0, size, 1], [size, size, 1]], dtype=np.float64)
        pts = corners @ inv.T
        x0, y0 = np.floor(pts.min(0)) - 2 * factor
        x1, y1 = np.ceil(pts.max(0)) + 2 * factor
        w = int(np.ceil((x1 - x0) / factor)) * factor
        h = int(np.ceil((y1 - y0) / factor)) * factor
        region = _crop(image, (int(x0), int(y0), int(x0) + w, int(y0) + h), fill)
        image = region.resize((w // factor, h // factor), Image.Resampling.BOX)
        # input coords of the shrunk region: p_small = (p - origin) / factor
        shift = np.array([[1.0 / factor, 0, -int(x0) / factor], [0, 1.0 / factor, -int(y0) / factor], [0, 0, 1]])
        m = m @ np.linalg.inv(shift)
        inv = _invert(m)
    coeffs = tuple(inv[0].tolist() + inv[1].tolist())
    return image.transform((size, size), Image.Transform.AFFINE, coeffs, resample=Image.Resampling.BILINEAR,
                           fillcolor=fill)


def _crop(image: Image.Image, box: tuple[int, int, int, int], fill) -> Image.Image:
    """``image.crop(box)`` with ``fill`` (not black) where the box leaves the image."""
    if fill is None:
        return image.crop(box)
    out = Image.new("RGB", (box[2] - box[0], box[3] - box[1]), tuple(fill))
    out.paste(image, (-box[0], -box[1]))
    return out


def _invert(m: np.ndarray) -> np.ndarray:
    full = np.vstack([m, [0.0, 0.0, 1.0]])
    return np.linalg.inv(full)[:2]
