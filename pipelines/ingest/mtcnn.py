"""MTCNN face detector (P-Net, R-Net, O-Net): boxes, scores and 5 landmarks per face.

The network definitions and the three-stage cascade follow facenet-pytorch
(https://github.com/timesler/facenet-pytorch, ``models/mtcnn.py`` and
``models/utils/detect_face.py``, MIT licence, Copyright (c) 2019 Timothy Esler), itself a port
of Zhang et al., "Joint Face Detection and Alignment using Multi-task Cascaded Convolutional
Networks" (2016). We keep our own copy because facenet-pytorch pins torch<2.3 / numpy<2 and its
code is not needed: only its weight files (``facenet_pytorch/data/{pnet,rnet,onet}.pt``) are
loaded, with ``torch.load(weights_only=True)`` so no pickled code runs.

Differences from the original: no OpenCV path; images of different sizes are accepted in one
call (they are grouped by size, and each group runs the cascade as one batch); results are
plain numpy arrays per image.
"""
from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn.functional import interpolate
from torchvision.ops.boxes import batched_nms

INSTALL_HINT = "pip install --no-deps facenet-pytorch==2.6.0"


class PNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 10, kernel_size=3)
        self.prelu1 = nn.PReLU(10)
        self.pool1 = nn.MaxPool2d(2, 2, ceil_mode=True)
        self.conv2 = nn.Conv2d(10, 16, kernel_size=3)
        self.prelu2 = nn.PReLU(16)
        self.conv3 = nn.Conv2d(16, 32, kernel_size=3)
        self.prelu3 = nn.PReLU(32)
        self.conv4_1 = nn.Conv2d(32, 2, kernel_size=1)
        self.softmax4_1 = nn.Softmax(dim=1)
        self.conv4_2 = nn.Conv2d(32, 4, kernel_size=1)

    def forward(self, x):
        x = self.prelu1(self.conv1(x))
        x = self.pool1(x)
        x = self.prelu2(self.conv2(x))
        x = self.prelu3(self.conv3(x))
        return self.conv4_2(x), self.softmax4_1(self.conv4_1(x))


class RNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 28, kernel_size=3)
        self.prelu1 = nn.PReLU(28)
        self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv2 = nn.Conv2d(28, 48, kernel_size=3)
        self.prelu2 = nn.PReLU(48)
        self.pool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv3 = nn.Conv2d(48, 64, kernel_size=2)
        self.prelu3 = nn.PReLU(64)
        self.dense4 = nn.Linear(576, 128)
        self.prelu4 = nn.PReLU(128)
        self.dense5_1 = nn.Linear(128, 2)
        self.softmax5_1 = nn.Softmax(dim=1)
        self.dense5_2 = nn.Linear(128, 4)

    def forward(self, x):
        x = self.pool1(self.prelu1(self.conv1(x)))
        x = self.pool2(self.prelu2(self.conv2(x)))
        x = self.prelu3(self.conv3(x))
        x = x.permute(0, 3, 2, 1).contiguous()
        x = self.prelu4(self.dense4(x.view(x.shape[0], -1)))
        return self.dense5_2(x), self.softmax5_1(self.dense5_1(x))


class ONet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 32, kernel_size=3)
        self.prelu1 = nn.PReLU(32)
        self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv2 = nn.Conv2d(32, 64, kernel_size=3)
        self.prelu2 = nn.PReLU(64)
        self.pool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv3 = nn.Conv2d(64, 64, kernel_size=3)
        self.prelu3 = nn.PReLU(64)
        self.pool3 = nn.MaxPool2d(2, 2, ceil_mode=True)
        self.conv4 = nn.Conv2d(64, 128, kernel_size=2)
        self.prelu4 = nn.PReLU(128)
        self.dense5 = nn.Linear(1152, 256)
        self.prelu5 = nn.PReLU(256)
        self.dense6_1 = nn.Linear(256, 2)
        self.softmax6_1 = nn.Softmax(dim=1)
        self.dense6_2 = nn.Linear(256, 4)
        self.dense6_3 = nn.Linear(256, 10)

    def forward(self, x):
        x = self.pool1(self.prelu1(self.conv1(x)))
        x = self.pool2(self.prelu2(self.conv2(x)))
        x = self.pool3(self.prelu3(self.conv3(x)))
        x = self.prelu4(self.conv4(x))
        x = x.permute(0, 3, 2, 1).contiguous()
        x = self.prelu5(self.dense5(x.view(x.shape[0], -1)))
        return self.dense6_2(x), self.dense6_3(x), self.softmax6_1(self.dense6_1(x))


def weights_dir() -> Path:
    """Folder holding pnet.pt / rnet.pt / onet.pt: ``OPQN_MTCNN_WEIGHTS`` or the facenet-pytorch package.

    The package is located without importing it (its code does not run with our torch).
    """
    env = os.environ.get("OPQN_MTCNN_WEIGHTS")
    if env:
        path = Path(env)
    else:
        spec = importlib.util.find_spec("facenet_pytorch")
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(
                "MTCNN weights not found: the facenet-pytorch package is not installed. "
                f"Install its weight files with `{INSTALL_HINT}` "
                "(or set OPQN_MTCNN_WEIGHTS to a folder holding pnet.pt, rnet.pt, onet.pt)"
            )
        path = Path(list(spec.submodule_search_locations)[0]) / "data"
    missing = [n for n in ("pnet.pt", "rnet.pt", "onet.pt") if not (path / n).is_file()]
    if missing:
        raise FileNotFoundError(f"MTCNN weights folder {path} lacks {', '.join(missing)}; try `{INSTALL_HINT}`")
    return path


@dataclass(frozen=True)
class Detections:
    """Faces found in one image, in the image's pixel coordinates, highest score first."""

    boxes: np.ndarray  # (N, 4) float32 x1, y1, x2, y2
    scores: np.ndarray  # (N,) float32
    landmarks: np.ndarray  # (N, 5, 2) float32: left eye, right eye, nose, mouth left, mouth right

    def __len__(self) -> int:
        return len(self.scores)


class MTCNN:
    """The three networks with their weights, in eval mode, plus the detection cascade."""

    def __init__(self, min_face_size: int = 20, thresholds=(0.6, 0.7, 0.7), factor: float = 0.709,
                 weights: str | os.PathLike | None = None):
        folder = Path(weights) if weights else weights_dir()
        self.pnet, self.rnet, self.onet = PNet(), RNet(), ONet()
        for name, net in (("pnet", self.pnet), ("rnet", self.rnet), ("onet", self.onet)):
            net.load_state_dict(torch.load(folder / f"{name}.pt", weights_only=True, map_location="cpu"))
            net.eval()
        self.min_face_size = min_face_size
        self.thresholds = tuple(thresholds)
        self.factor = factor

    def detect(self, images: list[np.ndarray]) -> list[Detections]:
        """Detect faces in RGB uint8 arrays (H, W, 3) of any sizes; one result per image.

        Images of equal size run through the cascade together (LFW photos are all 250x250,
        so a batch is one forward pass per pyramid level).
        """
        results: list[Detections | None] = [None] * len(images)
        groups: dict[tuple[int, int], list[int]] = {}
        for i, img in enumerate(images):
            if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
                raise ValueError(f"MTCNN wants RGB uint8 (H, W, 3) arrays, got {img.dtype} {img.shape}")
            groups.setdefault(img.shape[:2], []).append(i)
        with torch.inference_mode():
            for idx in groups.values():
                batch = torch.from_numpy(np.stack([images[i] for i in idx]))
                for i, det in zip(idx, self._detect_batch(batch)):
                    results[i] = det
        return results  # type: ignore[return-value]

    def _detect_batch(self, imgs: torch.Tensor) -> list[Detections]:
        imgs = imgs.permute(0, 3, 1, 2).float()
        batch_size = len(imgs)
        h, w = imgs.shape[2:4]
        m = 12.0 / self.min_face_size
        minl = min(h, w) * m
        scales = []
        scale_i = m
        while minl >= 12:
            scales.append(scale_i)
            scale_i *= self.factor
            minl *= self.factor
        th = self.thresholds

        # Stage 1: P-Net over the image pyramid.
        boxes, image_inds, scale_picks = [], [], []
        offset = 0
        for scale in scales:
            im_data = interpolate(imgs, size=(int(h * scale + 1), int(w * scale + 1)), mode="area")
            im_data = (im_data - 127.5) * 0.0078125
            reg, probs = self.pnet(im_data)
            boxes_scale, inds_scale = _generate_bounding_box(reg, probs[:, 1], scale, th[0])
            boxes.append(boxes_scale)
            image_inds.append(inds_scale)
            pick = batched_nms(boxes_scale[:, :4], boxes_scale[:, 4], inds_scale, 0.5)
            scale_picks.append(pick + offset)
            offset += boxes_scale.shape[0]
        if not scales:
            return [_empty() for _ in range(batch_size)]
        boxes = torch.cat(boxes, dim=0)
        image_inds = torch.cat(image_inds, dim=0)
        scale_picks = torch.cat(scale_picks, dim=0)
        boxes, image_inds = boxes[scale_picks], image_inds[scale_picks]
        pick = batched_nms(boxes[:, :4], boxes[:, 4], image_inds, 0.7)
        boxes, image_inds = boxes[pick], image_inds[pick]
        regw = boxes[:, 2] - boxes[:, 0]
        regh = boxes[:, 3] - boxes[:, 1]
        boxes = torch.stack([
            boxes[:, 0] + boxes[:, 5] * regw,
            boxes[:, 1] + boxes[:, 6] * regh,
            boxes[:, 2] + boxes[:, 7] * regw,
            boxes[:, 3] + boxes[:, 8] * regh,
            boxes[:, 4],
        ]).permute(1, 0)
        boxes = _rerec(boxes)

        # Stage 2: R-Net on 24x24 crops.
        if len(boxes) > 0:
            im_data, keep = _crops(imgs, boxes, image_inds, w, h, 24)
            boxes, image_inds = boxes[keep], image_inds[keep]
            out0, out1 = self.rnet(im_data)
            score = out1[:, 1]
            ipass = score > th[1]
            boxes = torch.cat((boxes[ipass, :4], score[ipass].unsqueeze(1)), dim=1)
            image_inds = image_inds[ipass]
            mv = out0[ipass]
            pick = batched_nms(boxes[:, :4], boxes[:, 4], image_inds, 0.7)
            boxes, image_inds, mv = boxes[pick], image_inds[pick], mv[pick]
            boxes = _rerec(_bbreg(boxes, mv))

        # Stage 3: O-Net on 48x48 crops, with landmarks.
        points = torch.zeros(0, 5, 2)
        if len(boxes) > 0:
            im_data, keep = _crops(imgs, boxes, image_inds, w, h, 48)
            boxes, image_inds = boxes[keep], image_inds[keep]
            out0, out1, out2 = self.onet(im_data)
            score = out2[:, 1]
            ipass = score > th[2]
            pts = out1[ipass].permute(1, 0)
            boxes = torch.cat((boxes[ipass, :4], score[ipass].unsqueeze(1)), dim=1)
            image_inds = image_inds[ipass]
            mv = out0[ipass]
            w_i = boxes[:, 2] - boxes[:, 0] + 1
            h_i = boxes[:, 3] - boxes[:, 1] + 1
            points_x = w_i.repeat(5, 1) * pts[:5, :] + boxes[:, 0].repeat(5, 1) - 1
            points_y = h_i.repeat(5, 1) * pts[5:10, :] + boxes[:, 1].repeat(5, 1) - 1
            points = torch.stack((points_x, points_y)).permute(2, 1, 0)
            boxes = _bbreg(boxes, mv)
            pick = _nms_min(boxes[:, :4].numpy(), boxes[:, 4].numpy(), image_inds.numpy(), 0.7)
            boxes, image_inds, points = boxes[pick], image_inds[pick], points[pick]

        boxes_np = boxes.numpy().astype(np.float32)
        points_np = points.numpy().astype(np.float32)
        inds_np = image_inds.numpy()
        out = []
        for b in range(batch_size):
            sel = np.where(inds_np == b)[0]
            if len(sel) == 0:
                out.append(_empty())
                continue
            order = sel[np.argsort(-boxes_np[sel, 4], kind="stable")]
            out.append(Detections(boxes_np[order, :4].copy(), boxes_np[order, 4].copy(), points_np[order].copy()))
        return out


def _empty() -> Detections:
    return Detections(np.zeros((0, 4), np.float32), np.zeros((0,), np.float32), np.zeros((0, 5, 2), np.float32))


def _crops(imgs, boxes, image_inds, w, h, size):
    """Resampled crops of each box (zero-padded at the image border is not needed: boxes are clipped)."""
    b = boxes.trunc().int().numpy()
    x, y = np.maximum(b[:, 0], 1), np.maximum(b[:, 1], 1)
    ex, ey = np.minimum(b[:, 2], w), np.minimum(b[:, 3], h)
    crops, keep = [], []
    for k in range(len(b)):
        if ey[k] > (y[k] - 1) and ex[k] > (x[k] - 1):
            img_k = imgs[image_inds[k], :, (y[k] - 1):ey[k], (x[k] - 1):ex[k]].unsqueeze(0)
            crops.append(interpolate(img_k, size=(size, size), mode="area"))
            keep.append(k)
    if not crops:
        return torch.zeros(0, 3, size, size), torch.zeros(0, dtype=torch.long)
    return (torch.cat(crops, dim=0) - 127.5) * 0.0078125, torch.as_tensor(keep, dtype=torch.long)


def _bbreg(boxes, reg):
    w = boxes[:, 2] - boxes[:, 0] + 1
    h = boxes[:, 3] - boxes[:, 1] + 1
    boxes = boxes.clone()
    boxes[:, :4] = torch.stack([
        boxes[:, 0] + reg[:, 0] * w,
        boxes[:, 1] + reg[:, 1] * h,
        boxes[:, 2] + reg[:, 2] * w,
        boxes[:, 3] + reg[:, 3] * h,
    ]).permute(1, 0)
    return boxes


def _generate_bounding_box(reg, probs, scale, thresh):
    stride, cellsize = 2, 12
    reg = reg.permute(1, 0, 2, 3)
    mask = probs >= thresh
    mask_inds = mask.nonzero()
    image_inds = mask_inds[:, 0]
    score = probs[mask]
    reg = reg[:, mask].permute(1, 0)
    bb = mask_inds[:, 1:].type(reg.dtype).flip(1)
    q1 = ((stride * bb + 1) / scale).floor()
    q2 = ((stride * bb + cellsize - 1 + 1) / scale).floor()
    return torch.cat([q1, q2, score.unsqueeze(1), reg], dim=1), image_inds


def _rerec(boxes):
    """Make boxes square around their centre."""
    boxes = boxes.clone()
    h = boxes[:, 3] - boxes[:, 1]
    w = boxes[:, 2] - boxes[:, 0]
    side = torch.max(w, h)
    boxes[:, 0] = boxes[:, 0] + w * 0.5 - side * 0.5
    boxes[:, 1] = boxes[:, 1] + h * 0.5 - side * 0.5
    boxes[:, 2:4] = boxes[:, :2] + side.repeat(2, 1).permute(1, 0)
    return boxes


def _nms_min(boxes, scores, idxs, threshold):
    """Per-image NMS with the "Min" overlap (intersection over the smaller box), as in MTCNN's last stage."""
    if len(boxes) == 0:
        return np.zeros((0,), np.int64)
    offsets = idxs.astype(boxes.dtype) * (boxes.max() + 1)
    b = boxes + offsets[:, None]
    x1, y1, x2, y2 = b[:, 0], b[:, 1], b[:, 2], b[:, 3]
    area = (x2 - x1 + 1) * (y2 - y1 + 1)
    order = np.argsort(scores)
    pick = []
    while order.size > 0:
        i = order[-1]
        pick.append(i)
        rest = order[:-1]
        ww = np.maximum(0.0, np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]) + 1)
        hh = np.maximum(0.0, np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]) + 1)
        inter = ww * hh
        overlap = inter / np.minimum(area[i], area[rest])
        order = rest[overlap <= threshold]
    return np.asarray(pick, dtype=np.int64)
