"""Quality on unseen identities: PQ codes, float features, and the exact re-rank in between.

Protocol (the cross-domain case of docs/opqn-method.md):

- Unseen set: LFW identities with 2-4 photos (``pipelines.evaluate.protocols``' cross split of
  an identity folder, as ``benchmarks/paper_tables.py`` builds it): one query per identity
  (seeded hash of the file name), the rest the database.
- Training set: LFW identities with >= ``--min-train-photos`` (5) photos, none of them in the
  unseen set; every photo of them. One OPQN (``--method``, default ``opqn``) is trained with
  ``pipelines.train.local.train_method`` (the trainer's loop and recipe).
- mAP over the full ranking of the unseen database (``model.metrics``: ties by database index):
  ``map_pq`` the codes (LUT scores ``sum_m P_q[m, b_im]``), ``map_float`` the cosine of the
  model's l2-normalised float features (``pipelines.evaluate.evaluation.evaluate_model``: the
  same two numbers ``opqn evaluate --protocol cross`` reports), and ``map_rerank_R`` for each
  ``--rerank`` R: the PQ top-R (``pipelines.query.kernels.topk``, the query stage's scan: score
  desc, then database index) re-scored by ``model.features.exact_cosine`` against the
  features as a gallery stores them (``model.features.stored_feature``: normalised,
  float16), ordered by (cosine desc, index), followed by the rest of the database in PQ order.
  This is computed in-process with numpy/torch using the query stage's own functions, not
  through Ray and Parquet (``tests/test_rerank.py`` checks the stage equals this computation).
- Compact refine (``map_refine``): the PQ top-R (R = the largest ``--rerank``) re-scored by a
  ``--refine-bytes`` B refine code (``model.refine``: the quantizer trained, as encode trains
  a gallery's, on the first 50,000 unseen database faces, seeded), scored as the query stage's
  ``--refine`` scores (``pipelines.query.rerank.Rescorer``); ``refine_bytes`` = code bytes + B,
  the whole budget per face (64 at 32 bit and B = 60).
- Code spread (``largest_bucket``): the largest code bucket's share of the unseen database
  (``model.code_spread``, as `opqn evaluate` reports it).
- Prepared sets (``--unseen-dataset URL``, ``--att-dataset URL``): face datasets written by
  ``opqn prepare`` (MTCNN-aligned crops, as ``benchmarks/generalization.py`` builds them) replace
  the LFW folder's unseen split and the AT&T folder: their ``query`` rows against their
  ``database`` rows (``load_split``'s single protocol on shards, no centre crop), so a model
  trained on aligned crops is measured on aligned crops. ``--extra-dataset NAME=URL`` (repeatable)
  adds any other such set, reported as ``NAME: {map_pq, map_float, largest_bucket}`` in the JSON.
- AT&T faces (``att_p5_pq``, ``att_p5_float``): P@5 of the codes and of the float features on
  the 40 grey AT&T identities (``--att-queries`` queries each, the rest database, tight crops:
  the cross-domain split of ``benchmarks/paper_tables.py``), with its ``att_largest_bucket``.
- Bytes: extra bytes per face for the features (raw 2 x D, and a feature shard written as the
  encode stage writes it, zstd Parquet), beside the code bytes per face.
- Time per query (batch of all queries, in this process, ``--threads`` threads): the PQ scan
  to the top-R alone and with the re-rank, for each R; the gallery is the unseen database
  (small), so these are per-query costs at this size, not a scan-rate benchmark
  (``benchmarks/query_scan.py`` is).

The last line is one JSON object: ``{"bits", "map_pq", "map_float", "map_rerank" (at the largest
R, 1000 by default), "map_refine", "refine_bytes", "ratio" (map_pq / map_float), "rerank_ratio"
(map_rerank / map_float), "refine_ratio" (map_refine / map_float), "largest_bucket",
"att_p5_pq", "att_p5_float", ...}``.

``--model-url URL``: a checkpoint already there is evaluated as it is (its own image size, width
and crop; never retrained or overwritten; its training identities must not include the unseen
ones); a missing one is trained with the flags and saved there.

    nice -n 10 .venv/bin/python benchmarks/unseen_quality.py --bits 32 --epochs 30 --width 0.5
    nice -n 10 .venv/bin/python benchmarks/unseen_quality.py --model-url runs/x/model.pt   # evaluate only
    nice -n 10 .venv/bin/python benchmarks/unseen_quality.py --smoke     # a minute or two, checks it runs
    nice -n 10 .venv/bin/python benchmarks/unseen_quality.py --model-url runs/x/model.pt \
        --unseen-dataset runs/generalization/unseen_lfw-64px --att-dataset runs/generalization/att-64px \
        --extra-dataset grey_dark=runs/generalization/grey_dark-64px        # aligned crops
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from model.features import embed, normalized_feature, stored_feature  # noqa: E402
from model.metrics import retrieval_metrics  # noqa: E402
from model.refine import CODE_SOURCES, train_gallery_codes, train_quantizer  # noqa: E402
from model.registry import METHODS, get_method, method_of  # noqa: E402
from model.scoring import lut_scores  # noqa: E402
from pipelines.encode.run import EncodeConfig  # noqa: E402
from pipelines.evaluate.evaluation import evaluate_model  # noqa: E402
from pipelines.evaluate.protocols import check_split, load_split, per_identity_split  # noqa: E402
from pipelines.formats.checkpoint import (checkpoint_exists, load_checkpoint, model_from_checkpoint,  # noqa: E402
                                          require_opqn, stored_size)
from pipelines.formats.gallery import FEATURE_ROW_GROUP, code_bytes, code_schema, feature_table  # noqa: E402
from pipelines.formats.faces import FaceSet  # noqa: E402
from pipelines.photo_folder import list_identity_folder, load_face_set  # noqa: E402
from pipelines.query.kernels import topk  # noqa: E402
from pipelines.query.rerank import PAIR_CHUNK, Rescorer  # noqa: E402
from pipelines.settings import data_root  # noqa: E402
from pipelines.train.local import TrainConfig, train_method  # noqa: E402
from storage.tables import write_table  # noqa: E402

SMOKE = {"train_ids": 24, "train_photos": 8, "unseen_ids": 150, "epochs": 1, "width": 0.125, "batch_size": 64}


def by_identity(items: list[tuple[str, str]], max_ids: int = 0, max_photos: int = 0) -> list[tuple[str, str]]:
    """The first ``max_ids`` identities (sorted) and at most ``max_photos`` photos each (0: all)."""
    out, seen, count = [], [], {}
    for ident, path in items:
        if ident not in count:
            if max_ids and len(seen) >= max_ids:
                continue
            seen.append(ident)
            count[ident] = 0
        if max_photos and count[ident] >= max_photos:
            continue
        count[ident] += 1
        out.append((ident, path))
    return out


def unseen_split(lfw: str, stored: int, crop: float, max_ids: int, seed: int) -> tuple[FaceSet, FaceSet]:
    """LFW identities with 2-4 photos, one query each, the rest database (load_split's cross split)."""
    items = by_identity(list_identity_folder(lfw, min_photos=2, max_photos=4), max_ids)
    faces = load_face_set(items, stored, crop, threads=2)
    is_q = per_identity_split(faces.labels, faces.paths, 1, 0.0, seed)
    queries, database = faces.subset(np.flatnonzero(is_q)), faces.subset(np.flatnonzero(~is_q))
    check_split(queries, database)
    return queries, database


def rerank_ranking(pq_scores: np.ndarray, rows: np.ndarray, exact: np.ndarray, M: int) -> np.ndarray:
    """A score matrix whose ranking (desc, ties by index) is: the PQ top-R rows by exact cosine
    first, then every other row in PQ order. PQ scores lie in [0, M] (model codes) or about [-1, 1]
    (gallery codes); candidates get M + 2 + cos."""
    out = pq_scores.astype(np.float64)
    q = np.arange(len(rows))[:, None]
    out[q, rows] = M + 2.0 + exact.astype(np.float64)
    return out


def rescore(rescorer: Rescorer, rows: np.ndarray, stored: np.ndarray) -> np.ndarray:
    """Re-rank scores of every (query, candidate row) of ``rows`` (nq, R), in chunks of pairs as the
    query stage scores them (nq x R x D float64 at once would not fit); ``stored``: the database's
    stored vectors (float16 features or refine codes) by row."""
    q_idx, r_idx = np.repeat(np.arange(rows.shape[0]), rows.shape[1]), rows.ravel()
    out = np.empty(len(q_idx), np.float32)
    for c0 in range(0, len(q_idx), PAIR_CHUNK):
        sl = slice(c0, c0 + PAIR_CHUNK)
        out[sl] = rescorer.scores(q_idx[sl], stored[r_idx[sl]])
    return out.reshape(rows.shape)


def get_model(args, cfg: TrainConfig, method, lfw: str, unseen_ids: set):
    """(model, training set description, train seconds): the checkpoint at ``--model-url`` as it
    is, or a model trained with ``cfg`` on LFW identities outside the unseen set (saved there)."""
    if cfg.model_url and checkpoint_exists(cfg.model_url):
        state = require_opqn(load_checkpoint(cfg.model_url), cfg.model_url)
        model = model_from_checkpoint(state)
        seen = sorted(set(state.get("classes") or []) & unseen_ids)
        if seen:
            raise SystemExit(f"{cfg.model_url} was trained on {len(seen)} of the unseen identities (e.g. {seen[:3]}): "
                             f"not a test on unseen people")
        train = state.get("train") or {}
        print(f"evaluating the existing checkpoint {cfg.model_url} as it is ({train.get('epochs', '?')} epochs, "
              f"width {model.cfg.width}, {model.cfg.image_size}px; not training: pass another --model-url to train)",
              file=sys.stderr, flush=True)
        return model, {"train_identities": len(state.get("classes") or []), "train_faces": None,
                       "epochs": state.get("epoch"), "model_id": state["model_id"]}, state.get("train_seconds")
    train_items = [(i, p) for i, p in list_identity_folder(lfw, min_photos=args.min_train_photos)
                   if i not in unseen_ids]
    if args.smoke:
        train_items = by_identity(train_items, SMOKE["train_ids"], SMOKE["train_photos"])
    train_set = load_face_set(train_items, cfg.stored_size(), cfg.crop_fraction, threads=2)
    train_ids = set(train_set.labels.tolist())
    assert not train_ids & unseen_ids, "training and unseen identities overlap"
    print(f"train: LFW identities with >= {args.min_train_photos} photos: {len(train_set)} faces of {len(train_ids)} "
          f"identities, none of them unseen", file=sys.stderr, flush=True)
    model, tinfo = train_method(method.name, cfg, train_set)
    return model, {"train_identities": len(train_ids), "train_faces": len(train_set), "epochs": args.epochs}, \
        round(tinfo["train_seconds"], 1)


def half_trained_map(model, queries: FaceSet, database: FaceSet, xq=None, xd=None) -> tuple[float, float]:
    """(mAP, P@5) of gallery codes whose quantizer was trained on every other database face only
    (``xq``, ``xd``: the sets' features when already computed)."""
    if xq is None:
        with torch.no_grad():
            xq, xd = embed(model, queries.images), embed(model, database.images)
    x = normalized_feature(xd)
    quantizer = train_gallery_codes(x[::2], model.cfg.M, model.cfg.K)
    codes = torch.from_numpy(quantizer.encode(x).astype(np.int64))
    m = retrieval_metrics(lut_scores(torch.from_numpy(quantizer.tables(xq.numpy())), codes).numpy(),
                          queries.labels, database.labels)
    return m["map"], m["precision_at"][5]


def timed(fn, repeats: int = 3):
    best, result = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - t0)
    return best, result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="", help="LFW identity folder (default: <OPQN_DATA or ../shared/data>/lfw)")
    variants = sorted(m for m in METHODS if METHODS[m].family == "opqn")
    ap.add_argument("--method", default="opqn", help=f"an OPQN variant: {variants}")
    ap.add_argument("--bits", type=int, default=32)
    ap.add_argument("--codewords", "-K", type=int, default=256, help="K codewords per codebook (M = bits / log2 K)")
    ap.add_argument("--dim", type=int, default=0, help="D (0: M * K)")
    ap.add_argument("--width", type=float, default=0.25)
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--min-train-photos", type=int, default=5)
    ap.add_argument("--rerank", default="100,1000", help="comma-separated R (PQ candidates re-scored exactly)")
    ap.add_argument("--refine-bytes", type=int, default=60,
                    help="B bytes of refine code per face (re-ranks the PQ top-R, R = the largest --rerank)")
    ap.add_argument("--refine-dim", type=int, default=0, help="projection before the refine PQ (0: encode's default)")
    ap.add_argument("--att-queries", type=int, default=2, help="AT&T queries per identity")
    ap.add_argument("--unseen-dataset", default="",
                    help="a prepared face dataset (query/database splits) used as the unseen set instead of LFW")
    ap.add_argument("--att-dataset", default="",
                    help="a prepared face dataset (query/database splits) used instead of the AT&T folder")
    ap.add_argument("--extra-dataset", action="append", default=[], metavar="NAME=URL",
                    help="another prepared face dataset: its map_pq, map_float and largest_bucket under NAME")
    ap.add_argument("--codes", choices=CODE_SOURCES, default="gallery",
                    help="which codes map_pq, ratio, largest_bucket and att_p5_pq report: gallery (`opqn encode --codes "
                         "gallery`: a quantizer trained on the database's faces) or model (the network's own); both "
                         "are always in the JSON line as *_gallery and *_model")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model-url", default="",
                    help="an existing checkpoint is evaluated as it is (no training); a missing one is trained and "
                         "saved here")
    ap.add_argument("--crop-fraction", type=float, default=None,
                    help="LFW centre crop (default: the model's training setting, 0.5 for a new model)")
    ap.add_argument("--smoke", action="store_true",
                    help=f"tiny run to check the script: {SMOKE['train_ids']} training and {SMOKE['unseen_ids']} "
                         f"unseen identities, {SMOKE['epochs']} epoch, width {SMOKE['width']}")
    args = ap.parse_args(argv)
    t_start = time.monotonic()
    torch.set_num_threads(args.threads)
    method = get_method(args.method)
    if method.family != "opqn":
        raise SystemExit(f"--method {args.method}: re-ranking needs an OPQN variant (codes + float features)")
    Rs = sorted({int(r) for r in args.rerank.split(",") if r})
    if not Rs or Rs[0] < 1:
        raise SystemExit("--rerank needs at least one R >= 1")
    if any("=" not in e or not e.split("=", 1)[0] for e in args.extra_dataset):
        raise SystemExit(f"--extra-dataset takes NAME=URL, got {args.extra_dataset}")
    if args.smoke:
        args.epochs, args.width, args.batch_size = SMOKE["epochs"], SMOKE["width"], SMOKE["batch_size"]
    lfw = args.data or str(data_root() / "lfw")

    cfg = TrainConfig(data=lfw, model_url=args.model_url, bits=args.bits, codewords=args.codewords, dim=args.dim,
                      width=args.width, image_size=args.image_size, epochs=args.epochs, batch_size=args.batch_size,
                      threads=args.threads, seed=args.seed, min_photos=args.min_train_photos, resume=False)
    existing = load_checkpoint(cfg.model_url) if cfg.model_url and checkpoint_exists(cfg.model_url) else None
    # faces are loaded as the model was trained: its stored size (image size x enlarge) and crop
    stored = stored_size(existing) if existing else cfg.stored_size()
    crop = args.crop_fraction or float((existing or {}).get("train", {}).get("crop_fraction", cfg.crop_fraction))
    if args.unseen_dataset:  # aligned crops as `opqn prepare` wrote them: no centre crop
        split = load_split(args.unseen_dataset, "single", stored, crop_fraction=1.0)
        queries, database, unseen_desc = split.queries, split.database, f"{args.unseen_dataset}, {split.description}"
    else:
        queries, database = unseen_split(lfw, stored, crop, SMOKE["unseen_ids"] if args.smoke else 0, args.seed)
        unseen_desc = "LFW identities with 2-4 photos"
    unseen_ids = set(queries.labels.tolist()) | set(database.labels.tolist())
    print(f"unseen: {unseen_desc}: {len(queries)} queries x {len(database)} database "
          f"({len(unseen_ids)} identities)", file=sys.stderr, flush=True)
    model, trained, train_seconds = get_model(args, cfg, method, lfw, unseen_ids)
    model.eval()
    method = method_of(model)
    M, K, D = model.cfg.M, model.cfg.K, model.cfg.D
    bytes_per_code = code_bytes(M, K)

    # PQ and float mAP exactly as `opqn evaluate` computes them, with the database codes' spread,
    # for the model's own codes and for gallery codes (a quantizer trained on the database)
    evs = {c: evaluate_model(model, queries, database, codes=c) for c in ("model", "gallery")}
    ev = evs[args.codes]
    map_pq, map_float = ev["quantized"]["map"], ev["float"]["map"]

    # re-rank, with the query stage's functions: scan kernel, stored float16 feature, exact cosine
    with torch.no_grad():
        xq, xd = embed(model, queries.images), embed(model, database.images)
        tables = model.tables_from_features(xq).numpy().astype(np.float32)
        codes = model.codes_from_features(xd).numpy()
    nd = normalized_feature(xd)
    if args.codes == "gallery":  # the PQ candidates of the re-rank come from the gallery codes, as in the query stage
        code_q = train_gallery_codes(nd[:EncodeConfig.refine_sample], M, K)
        tables, codes = code_q.tables(xq.numpy()), code_q.encode(nd)
    feats = stored_feature(xd)
    # the refine quantizer, trained as encode trains a gallery's: on its first faces, seeded
    t_q = time.monotonic()
    quantizer = train_quantizer(nd[:EncodeConfig.refine_sample], args.refine_bytes, args.refine_dim)
    refine_train_s = time.monotonic() - t_q
    refine_codes = quantizer.encode(nd)
    exact, refine = Rescorer.exact(xq.numpy()), Rescorer.refine(quantizer, xq.numpy())
    nq, N = len(queries), len(database)
    pq_scores = lut_scores(torch.from_numpy(tables), torch.from_numpy(codes.astype(np.int64))).numpy()
    results = {}
    for R in Rs:
        scan_s, (_, rows) = timed(lambda: topk(tables, codes, R, kernel="auto"))
        rerank_s, scores = timed(lambda: rescore(exact, rows, feats))
        m = retrieval_metrics(rerank_ranking(pq_scores, rows, scores, M), queries.labels, database.labels)
        results[R] = {"map": m["map"], "candidates": int(rows.shape[1]),
                      "ms_per_query_scan": 1e3 * scan_s / nq, "ms_per_query_scan_rerank": 1e3 * (scan_s + rerank_s) / nq}
        print(f"re-rank R={R} ({rows.shape[1]} of {N} candidates): mAP {m['map']:.4f}; per query "
              f"{results[R]['ms_per_query_scan']:.3f} ms PQ scan to top-{R}, "
              f"{results[R]['ms_per_query_scan_rerank']:.3f} ms with the re-rank", file=sys.stderr, flush=True)
    R_top = Rs[-1]
    refine_s, scores = timed(lambda: rescore(refine, rows, refine_codes))  # rows: the PQ top-R_top
    map_refine = retrieval_metrics(rerank_ranking(pq_scores, rows, scores, M), queries.labels,
                                   database.labels)["map"]
    print(f"refine R={R_top}: {args.refine_bytes}-byte refine code (PQ over a {quantizer.dim}-dim projection, trained "
          f"on {min(N, EncodeConfig.refine_sample)} faces in {refine_train_s:.1f} s): mAP {map_refine:.4f}; "
          f"{1e3 * refine_s / nq:.3f} ms per query for the refine scores", file=sys.stderr, flush=True)

    # cross-domain: AT&T's grey, studio-lit faces (unseen identities), P@5 of codes and float features
    att = (load_split(args.att_dataset, "single", stored, crop_fraction=1.0) if args.att_dataset else
           load_split(str(data_root() / "att_faces"), "cross", stored, 1.0, min_photos=2,
                      queries_per_identity=args.att_queries))
    att_evs = {c: evaluate_model(model, att.queries, att.database, codes=c) for c in ("model", "gallery")}
    att_ev = att_evs[args.codes]
    att_p5_pq, att_p5_float = att_ev["quantized"]["precision_at"][5], att_ev["float"]["precision_at"][5]
    # a check that gallery codes do not just memorise a small database: the quantizer trained on
    # every other database face only, then applied to all of them
    half = {"unseen": half_trained_map(model, queries, database, xq, xd), "att": half_trained_map(model, att.queries,
                                                                                          att.database)}
    print(f"AT&T faces ({len(att.queries)} queries x {len(att.database)} database): P@5 codes {att_p5_pq:.4f}, "
          f"float {att_p5_float:.4f}; largest code bucket {100 * att_ev['code_spread']['largest_bucket']:.1f}%",
          file=sys.stderr, flush=True)
    warnings, extra = ev["warnings"] + att_ev["warnings"], {}
    for name, url in (e.split("=", 1) for e in args.extra_dataset):
        s = load_split(url, "single", stored, crop_fraction=1.0)
        e = evaluate_model(model, s.queries, s.database)
        extra[name] = {"map_pq": round(e["quantized"]["map"], 4), "map_float": round(e["float"]["map"], 4),
                       "largest_bucket": round(e["code_spread"]["largest_bucket"], 4)}
        warnings += e["warnings"]
        print(f"{name} ({len(s.queries)} queries x {len(s.database)} database): mAP codes {extra[name]['map_pq']:.4f}, "
              f"float {extra[name]['map_float']:.4f}; largest code bucket {100 * extra[name]['largest_bucket']:.1f}%",
              file=sys.stderr, flush=True)
    for warning in warnings:
        print(warning, file=sys.stderr, flush=True)

    # bytes per face: features as the encode stage writes them, beside the codes
    with tempfile.TemporaryDirectory() as tmp:
        ids = [f"f{i}" for i in range(N)]
        fsize = write_table(os.path.join(tmp, "features.parquet"), feature_table(ids, feats, D),
                            row_group_size=FEATURE_ROW_GROUP).size
        schema = code_schema(M, K)
        ctable = pa.table({"face_id": ids, "identity": database.labels.tolist(),
                           "codes": pa.FixedSizeListArray.from_arrays(
                               pa.array(codes.reshape(-1), schema.field("codes").type.value_type), M)}, schema=schema)
        csize = write_table(os.path.join(tmp, "codes.parquet"), ctable).size

    map_rerank = results[R_top]["map"]
    largest_bucket = ev["code_spread"]["largest_bucket"]
    print(f"{method.label} {int(round(model.cfg.bits))} bit (M={M}, K={K}, D={D}), {model.cfg.image_size}px width "
          f"{model.cfg.width}: unseen mAP PQ {map_pq:.4f}, float {map_float:.4f}, "
          + ", ".join(f"re-rank@{R} {results[R]['map']:.4f}" for R in Rs)
          + f", refine@{R_top} {map_refine:.4f} at {bytes_per_code + args.refine_bytes} B/face; largest code bucket "
          f"{100 * largest_bucket:.1f}%; AT&T P@5 codes {att_p5_pq:.4f} float {att_p5_float:.4f}; "
          f"features +{2 * D} B/face raw ({fsize / N:.0f} B/face in Parquet) vs codes {bytes_per_code} "
          f"B/face raw ({csize / N:.1f} in Parquet); {time.monotonic() - t_start:.0f} s", flush=True)
    if R_top >= N:
        print(f"(R={R_top} >= the {N} database faces: the re-rank is exact float search over float16 features, "
              f"so map_rerank should be within ~1e-3 of map_float: {map_rerank - map_float:+.4f})", flush=True)
    out = {"bits": int(round(model.cfg.bits)), "codes": args.codes, "map_pq": round(map_pq, 4),
           "map_float": round(map_float, 4),
           "map_rerank": round(map_rerank, 4), "map_refine": round(map_refine, 4),
           "refine_bytes": bytes_per_code + args.refine_bytes, "ratio": round(map_pq / map_float, 4),
           "rerank_ratio": round(map_rerank / map_float, 4), "refine_ratio": round(map_refine / map_float, 4),
           "largest_bucket": round(largest_bucket, 4), "att_p5_pq": round(att_p5_pq, 4),
           "att_p5_float": round(att_p5_float, 4), "rerank_R": R_top,
           **{f"map_rerank_{R}": round(results[R]["map"], 4) for R in Rs},
           "refine_code_bytes": args.refine_bytes, "refine_dim": quantizer.dim,
           "att_largest_bucket": round(att_ev["code_spread"]["largest_bucket"], 4),
           **{f"map_pq_{c}": round(e["quantized"]["map"], 4) for c, e in evs.items()},
           **{f"largest_bucket_{c}": round(e["code_spread"]["largest_bucket"], 4) for c, e in evs.items()},
           **{f"att_p5_pq_{c}": round(e["quantized"]["precision_at"][5], 4) for c, e in att_evs.items()},
           "map_pq_gallery_half": round(half["unseen"][0], 4), "att_p5_pq_gallery_half": round(half["att"][1], 4),
           "code_entropy_bits": round(ev["code_spread"]["code_entropy_bits"], 3),
           "codewords_used_mean": round(ev["code_spread"]["codewords_used_mean"], 1),
           "feature_bytes_per_face_raw": 2 * D, "feature_bytes_per_face_parquet": round(fsize / N, 1),
           "code_bytes_per_face_parquet": round(csize / N, 1),
           "ms_per_query": {str(R): {"pq_scan": round(results[R]["ms_per_query_scan"], 4),
                                     "pq_scan_and_rerank": round(results[R]["ms_per_query_scan_rerank"], 4)}
                            for R in Rs},
           "M": M, "K": K, "D": D, "method": method.name, "width": model.cfg.width,
           "image_size": model.cfg.image_size, **trained, "queries": nq, "database": N,
           "att_queries": len(att.queries), "att_database": len(att.database), "train_seconds": train_seconds,
           "smoke": args.smoke, "unseen_dataset": args.unseen_dataset or None,
           "att_dataset": args.att_dataset or None, **extra}
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
