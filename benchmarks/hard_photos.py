"""Detection on hard photos: the ingest (first pass, then its retries: pipelines.ingest.retry) vs
facenet-pytorch's MTCNN with its default settings, on the same images.

Hard photos, made on purpose from the shared data (seeded):

- ``tight``: an LFW photo cut to its face box (found by the plain detector on the whole photo)
  with a margin drawn from -12 % .. +4 % of the box side, so the frame cuts into forehead and
  chin as studio crops do and the face fills it;
- ``dark``: the whole photo times a horizontal ramp that leaves one side (drawn) 20-25 % bright;
- ``grey``: the whole photo in grey; and the combinations ``tight_dark``, ``tight_grey``,
  ``tight_dark_grey`` (one LFW identity per image, a different one per kind);
- ``att``: AT&T faces as they are (grey 92x112 studio crops), ``att_dark`` with the ramp.

Non-face images (false faces): square patches (15-40 % of the shorter side) cut from the
uncropped photos under photos/ away from every face a permissive detector (thresholds 0.5)
finds there (boxes grown by half their size), as they are (``patch``) and grey with the dark
ramp (``patch_dark_grey``).

A face counts as found when the ingest writes a face row for the image (``process_photos``,
default settings: score >= 0.9; "1st pass": the same detector without the retries), and for
facenet-pytorch when ``MTCNN().detect`` returns a box; "on the face" also wants the (kept / best) box's centre inside the known face box (LFW
kinds; AT&T: the middle half of the frame). Both run with one torch thread. Rates are given
for the tight-frame kinds (a face filling its frame: what defeats MTCNN) and for all face kinds
(one-sided light and grey alone, and AT&T as it is, are found by both detectors nearly always).

    nice -n 10 .venv/bin/python benchmarks/hard_photos.py [--per-kind 40] [--non-faces 40] [--seed 0]

Prints a table and one closing JSON line; ``--list`` names each face only the ingest finds
(with its cut) on stderr.
"""
from __future__ import annotations

import argparse
import importlib.util
import io
import json
import os
import random
import sys
import time
import types
from pathlib import Path

import numpy as np
from PIL import Image

FACE_KINDS = ("tight", "dark", "grey", "tight_dark", "tight_grey", "tight_dark_grey", "att", "att_dark")
TIGHT_KINDS = ("tight", "tight_dark", "tight_grey", "tight_dark_grey")
NON_FACE_KINDS = ("patch", "patch_dark_grey")


def dark(image: np.ndarray, keep: float, left_bright: bool) -> np.ndarray:
    """One-sided light: a horizontal ramp from full brightness to ``keep`` across the photo."""
    ramp = np.linspace(1.0, keep, image.shape[1]) if left_bright else np.linspace(keep, 1.0, image.shape[1])
    return (image.astype(np.float32) * ramp[None, :, None]).clip(0, 255).astype(np.uint8)


def grey(image: np.ndarray) -> np.ndarray:
    return np.repeat(np.asarray(Image.fromarray(image).convert("L"))[:, :, None], 3, axis=2)


def tight(image: np.ndarray, box, margin: float) -> tuple[np.ndarray, np.ndarray, tuple[int, int, int, int]]:
    """The photo cut to ``box`` grown by ``margin`` (a fraction of the box side, negative: inside),
    the box in the cut's coordinates, and the cut (left, top, right, bottom)."""
    x1, y1, x2, y2 = box
    m = margin * max(x2 - x1, y2 - y1)
    left, top = max(0, int(round(x1 - m))), max(0, int(round(y1 - m)))
    right, bottom = min(image.shape[1], int(round(x2 + m))), min(image.shape[0], int(round(y2 + m)))
    cut = (left, top, right, bottom)
    return image[top:bottom, left:right].copy(), np.array([x1 - left, y1 - top, x2 - left, y2 - top]), cut


def largest_face(det, min_score: float = 0.9):
    ok = np.where(det.scores >= min_score)[0]
    if not len(ok):
        return None
    boxes = det.boxes[ok]
    return boxes[int(np.argmax((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])))]


def lfw_faces(lfw: Path, n: int, rng: random.Random, detector) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """``n`` (name, photo, face box) from distinct LFW identities (seeded order), each photo
    with one face of at least 60 pixels found by the plain detector."""
    names = sorted(p.name for p in lfw.iterdir() if p.is_dir())
    rng.shuffle(names)
    out = []
    for name in names:
        if len(out) == n:
            break
        path = sorted((lfw / name).glob("*.jpg"))[0]
        image = np.asarray(Image.open(path).convert("RGB"))
        box = largest_face(detector.detect([image])[0])
        if box is not None and min(box[2] - box[0], box[3] - box[1]) >= 60:
            out.append((f"{name}/{path.name}", image, box))
    return out


def face_images(data: Path, per_kind: int, seed: int, detector) -> list[dict]:
    """The hard face images: ``{kind, name, image, box}`` (box None for AT&T)."""
    rng = random.Random(seed)
    base = lfw_faces(data / "lfw", 6 * per_kind, rng, detector)
    out = []
    for k, kind in enumerate(FACE_KINDS[:6]):
        for name, image, box in base[k * per_kind:(k + 1) * per_kind]:
            margin, keep, left = rng.uniform(-0.12, 0.04), rng.uniform(0.20, 0.25), rng.random() < 0.5
            if kind.startswith("tight"):
                image, box, cut = tight(image, box, margin)
                name += f" cut to {cut}"
            if "dark" in kind:
                image = dark(image, keep, left)
            if "grey" in kind:
                image = grey(image)
            out.append({"kind": kind, "name": name, "image": image, "box": box})
    people = sorted(p for p in (data / "att_faces").iterdir() if p.is_dir())
    for kind in FACE_KINDS[6:]:
        for person in rng.sample(people, min(per_kind, len(people))):
            path = person / f"{rng.randint(1, 10)}.pgm"
            image = np.asarray(Image.open(path).convert("RGB"))
            if kind == "att_dark":
                image = dark(image, rng.uniform(0.20, 0.25), rng.random() < 0.5)
            out.append({"kind": kind, "name": f"{person.name}/{path.name}", "image": image, "box": None})
    return out


def non_face_images(photos: Path, n: int, seed: int) -> list[dict]:
    """``n`` patches per non-face kind, cut away from every face found in the photos."""
    from pipelines.ingest.mtcnn import MTCNN

    permissive = MTCNN(thresholds=(0.5, 0.5, 0.5))
    rng = random.Random(seed + 1)
    files = sorted(p for p in photos.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    sources = []
    for path in files:
        im = Image.open(path).convert("RGB")
        im.thumbnail((800, 800))
        image = np.asarray(im)
        sources.append((path.name, image, permissive.detect([image])[0].boxes))
    out = []
    for kind in NON_FACE_KINDS:
        while sum(o["kind"] == kind for o in out) < n:
            name, image, boxes = rng.choice(sources)
            h, w = image.shape[:2]
            side = rng.randint(int(min(h, w) * 0.15), int(min(h, w) * 0.40))
            x, y = rng.randint(0, w - side), rng.randint(0, h - side)
            grown = [(x1 - (x2 - x1) / 2, y1 - (y2 - y1) / 2, x2 + (x2 - x1) / 2, y2 + (y2 - y1) / 2)
                     for x1, y1, x2, y2 in boxes]
            if any(x < b[2] and x + side > b[0] and y < b[3] and y + side > b[1] for b in grown):
                continue
            patch = image[y:y + side, x:x + side].copy()
            if kind == "patch_dark_grey":
                patch = grey(dark(patch, rng.uniform(0.20, 0.25), rng.random() < 0.5))
            out.append({"kind": kind, "name": f"{name}@{x},{y},{side}", "image": patch, "box": None})
    return out


def facenet_mtcnn():
    """facenet-pytorch's own MTCNN class. Its package ``__init__`` also imports the recognition
    model, which needs tqdm (for weight downloads), not installed here (the package is
    installed --no-deps); the MTCNN module needs neither, so it is loaded past that file."""
    try:
        from facenet_pytorch import MTCNN
    except ImportError:
        spec = importlib.util.find_spec("facenet_pytorch")
        if spec is None:
            raise SystemExit("facenet-pytorch is not installed: pip install --no-deps facenet-pytorch==2.6.0")
        package = types.ModuleType("facenet_pytorch")
        package.__path__, package.__spec__ = list(spec.submodule_search_locations), spec
        sys.modules["facenet_pytorch"] = package
        from facenet_pytorch.models.mtcnn import MTCNN
    return MTCNN(device="cpu")


def on_face(box, sample: dict) -> bool:
    """The box's centre lies inside the known face box (AT&T: the middle half of the frame)."""
    if box is None:
        return False
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    ref = sample["box"]
    if ref is None:
        h, w = sample["image"].shape[:2]
        ref = (w / 4, h / 4, 3 * w / 4, 3 * h / 4)
    return bool(ref[0] <= cx <= ref[2] and ref[1] <= cy <= ref[3])


def run_facenet(model, samples: list[dict]) -> list:
    """The best box facenet-pytorch returns for each image, or None."""
    out = []
    for s in samples:
        boxes, probs = model.detect(Image.fromarray(s["image"]))
        out.append(None if boxes is None or len(boxes) == 0 else np.asarray(boxes[int(np.argmax(probs))], float))
    return out


def run_ingest(detector, samples: list[dict], batch: int = 16) -> list:
    """The kept face's box for each image, through the ingest's own photo processing, or None."""
    from pipelines.ingest.config import IngestConfig
    from pipelines.ingest.photos import Photo, process_photos

    config = IngestConfig(size=64)
    out = []
    for start in range(0, len(samples), batch):
        photos = []
        for k, s in enumerate(samples[start:start + batch]):
            buf = io.BytesIO()
            Image.fromarray(s["image"]).save(buf, format="PNG")
            photos.append(Photo(f"{start + k}.png", None, None, buf.getvalue()))
        faces, _, _ = process_photos(photos, detector, config)
        kept = {row["source"]: np.asarray(row["box"], float) for row in faces}
        out += [kept.get(p.source) for p in photos]
    return out


def group(rows: dict, kinds) -> dict:
    """Counts summed over ``kinds``."""
    keys = ("n", "facenet", "first_pass", "ours", "facenet_on_face", "ours_on_face")
    return {k: sum(rows[kind][k] for kind in kinds) for k in keys}


def report(rows: dict) -> str:
    """The table: images found per kind, then the groups as rates."""
    lines = [f"{'kind':<22} {'images':>6} {'facenet':>8} {'1st pass':>8} {'ingest':>8} {'facenet on face':>16} "
             f"{'ingest on face':>15}"]
    for kind in FACE_KINDS + NON_FACE_KINDS:
        r = rows[kind]
        lines.append(f"{kind:<22} {r['n']:>6} {r['facenet']:>8} {r['first_pass']:>8} {r['ours']:>8} "
                     f"{r['facenet_on_face']:>16} "
                     f"{r['ours_on_face']:>15}")
    for label, kinds in (("tight frames (4 kinds)", TIGHT_KINDS), ("all face kinds", FACE_KINDS)):
        g = group(rows, kinds)
        rate = {k: g[k] / g["n"] for k in ("facenet", "first_pass", "ours", "facenet_on_face", "ours_on_face")}
        lines.append(f"{label:<22} {g['n']:>6} {rate['facenet']:>8.1%} {rate['first_pass']:>8.1%} {rate['ours']:>8.1%} "
                     f"{rate['facenet_on_face']:>16.1%} {rate['ours_on_face']:>15.1%}")
    g = group(rows, NON_FACE_KINDS)
    lines.append(f"{'non-face: false faces':<22} {g['n']:>6} {g['facenet']:>8} {g['first_pass']:>8} {g['ours']:>8}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="",
                    help="folder holding lfw/, att_faces/, photos/ (default: OPQN_DATA / ../shared/data)")
    ap.add_argument("--per-kind", type=int, default=40, help="images per hard face kind (default: 40)")
    ap.add_argument("--non-faces", type=int, default=40, help="images per non-face kind (default: 40)")
    ap.add_argument("--seed", type=int, default=0, help="seed of every random choice (default: 0)")
    ap.add_argument("--list", action="store_true", help="also print each face image the ingest finds and "
                                                         "facenet-pytorch misses")
    args = ap.parse_args(argv)

    import torch

    from pipelines.ingest.mtcnn import MTCNN
    from pipelines.settings import data_root

    torch.set_num_threads(1)
    data = Path(args.data) if args.data else data_root()
    start = time.perf_counter()
    ours = MTCNN()
    samples = face_images(data, args.per_kind, args.seed, ours) + non_face_images(data / "photos", args.non_faces,
                                                                                 args.seed)
    theirs = run_facenet(facenet_mtcnn(), samples)
    first = [bool((d.scores >= 0.9).any()) for d in ours.detect([s["image"] for s in samples])]
    mine = run_ingest(ours, samples)

    rows = {}
    for s, a, f, b in zip(samples, theirs, first, mine):
        r = rows.setdefault(s["kind"], {"n": 0, "facenet": 0, "first_pass": 0, "ours": 0, "facenet_on_face": 0,
                                        "ours_on_face": 0})
        face = s["kind"] in FACE_KINDS
        r["n"] += 1
        r["facenet"] += a is not None
        r["first_pass"] += f
        r["ours"] += b is not None
        r["facenet_on_face"] += face and on_face(a, s)
        r["ours_on_face"] += face and on_face(b, s)
        if args.list and face and b is not None and a is None:
            print(f"  found by the ingest only: {s['kind']} {s['name']}", file=sys.stderr)
    print(report(rows))
    groups = {"tight": group(rows, TIGHT_KINDS), "all": group(rows, FACE_KINDS),
              "non_face": group(rows, NON_FACE_KINDS)}
    print(json.dumps({
        "tight_frames": groups["tight"], "all_face_kinds": groups["all"],
        "ratio_tight": round(groups["tight"]["ours"] / max(groups["tight"]["facenet"], 1), 3),
        "ratio_all": round(groups["all"]["ours"] / max(groups["all"]["facenet"], 1), 3),
        "facenet_false_faces": groups["non_face"]["facenet"], "ingest_false_faces": groups["non_face"]["ours"],
        "non_face_images": groups["non_face"]["n"], "per_kind": rows, "seed": args.seed,
        "seconds": round(time.perf_counter() - start, 1)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
