"""Codes on people and photos a model never saw: quality and code spread of any OPQN checkpoint.

Each evaluation set goes the user's way: `opqn prepare` (MTCNN detect + align, the crop size
the model was trained on) into a face dataset with one query per identity for people with a
few photos, then ``opqn evaluate`` (codes and float features of the same model, plus the
spread of the database's codes). Sets:

- ``unseen_lfw``: LFW identities with 2-4 photos (none has >= 5, so none is in a model trained
  on identities with >= 5 or >= 10 photos), colour web photos.
- ``att``: AT&T faces, 40 people x 10 grey studio photos (2 queries each).
- ``grey_dark``: the unseen LFW photos turned grey, darkened and lit from one side (a ramp that
  leaves 25 % of the light on the dark side): photos taken in conditions unlike LFW's.

Reported per set: codes mAP and P@5, float mAP and P@5, the codes/float ratios, the largest
code bucket's share of the gallery and the codewords used per subspace.

    .venv/bin/python benchmarks/generalization.py --model-url runs/pipeline/model.pt [--workdir runs/generalization]

The last line is one JSON object: {set: {map_pq, map_float, p5_pq, p5_float, largest_bucket,
codewords_used, faces, identities}} per model (keyed by model URL when several are given).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from model.refine import CODE_SOURCES  # noqa: E402
from pipelines.evaluate.evaluation import evaluate_url  # noqa: E402
from pipelines.photo_folder import list_identity_folder  # noqa: E402
from pipelines.ingest.config import IngestConfig  # noqa: E402
from pipelines.ingest.run import prepare_dataset  # noqa: E402
from pipelines.settings import data_root  # noqa: E402

SETS = ("unseen_lfw", "att", "grey_dark")


def link_tree(items: list[tuple[str, str]], root: Path) -> Path:
    for ident, path in items:
        (root / ident).mkdir(parents=True, exist_ok=True)
        target = root / ident / os.path.basename(path)
        if not target.exists():
            target.symlink_to(path)
    return root


def grey_dark(path: str, out: Path) -> None:
    """Grey, 0.6x darker, lit from one side (the far side keeps 25 % of the light)."""
    with Image.open(path) as im:
        grey = np.asarray(im.convert("L"), dtype=np.float32)
    h, w = grey.shape
    ramp = np.linspace(1.0, 0.25, w, dtype=np.float32)[None, :]
    if zlib.crc32(os.path.basename(path).encode()) % 2:  # light from the left or the right, fixed per file
        ramp = ramp[:, ::-1]
    Image.fromarray(np.clip(grey * 0.6 * ramp, 0, 255).astype(np.uint8)).save(out, quality=92)


def photo_trees(workdir: Path, data: Path) -> dict[str, Path]:
    unseen = list_identity_folder(data / "lfw", min_photos=2, max_photos=4)
    trees = {"unseen_lfw": link_tree(unseen, workdir / "photos" / "unseen_lfw"),
             "att": data / "att_faces", "grey_dark": workdir / "photos" / "grey_dark"}
    for ident, path in unseen:
        target = trees["grey_dark"] / ident / (Path(path).stem + ".jpg")
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            grey_dark(path, target)
    return trees


def evaluate_sets(model_url: str, datasets: dict[str, str], codes: str = "model") -> dict:
    out = {}
    for name, dataset in datasets.items():
        r = evaluate_url(model_url, dataset, protocol="single", crop_fraction=1.0, codes=codes)["result"]
        q, f, spread = r["quantized"], r["float"], r["code_spread"]
        out[name] = {"map_pq": round(q["map"], 4), "map_float": round(f["map"], 4),
                     "p5_pq": round(q["precision_at"][5], 4), "p5_float": round(f["precision_at"][5], 4),
                     "largest_bucket": round(spread["largest_bucket"], 4),
                     "codewords_used": round(spread["codewords_used_mean"], 1),
                     "faces": q["database"] + q["queries"], "queries": q["queries"]}
        print(f"{name:11s} codes mAP {q['map']:.4f} P@5 {q['precision_at'][5]:.4f} | float mAP {f['map']:.4f} "
              f"P@5 {f['precision_at'][5]:.4f} | mAP ratio {q['map'] / max(f['map'], 1e-9):.2f} P@5 ratio "
              f"{q['precision_at'][5] / max(f['precision_at'][5], 1e-9):.2f} | largest bucket "
              f"{spread['largest_bucket']:.1%} of {q['database']}, codewords used {spread['codewords_used_mean']:.0f}",
              flush=True)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-url", required=True, help="one checkpoint or a comma-separated list")
    ap.add_argument("--workdir", default="runs/generalization", help="photo trees and prepared datasets (reused)")
    ap.add_argument("--crop-size", type=int, default=64, help="aligned crop size (the main job's: 64)")
    ap.add_argument("--sets", default=",".join(SETS))
    ap.add_argument("--codes", choices=CODE_SOURCES, default="model",
                    help="codes evaluated: the model's own, or gallery codes (`opqn encode --codes gallery`)")
    args = ap.parse_args(argv)
    workdir = Path(args.workdir).resolve()
    models = [u for u in args.model_url.split(",") if u]
    crop = args.crop_size
    trees = photo_trees(workdir, data_root())
    datasets = {}
    for name in args.sets.split(","):
        ds = workdir / f"{name}-{crop}px"
        prepare_dataset(str(trees[name]), str(ds), IngestConfig(size=crop, min_photos=2, query_fraction=0.2))
        datasets[name] = str(ds)
    results = {}
    for url in models:
        print(f"model {url}", flush=True)
        results[url] = evaluate_sets(url, datasets, args.codes)
    print(json.dumps(results[models[0]] if len(models) == 1 else results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
