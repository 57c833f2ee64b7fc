"""The evaluator: retrieval metrics of a trained model of any method on a query/database split.

One evaluator computes every metric: ``evaluate_model``, used by ``opqn evaluate``
(``evaluate_url``, which also writes the report) and the benchmarks, and in its flat form
``train_summary`` by the trainers' end-of-run metrics.

Besides mAP and P@T, every evaluation measures the spread of the database codes
(``model.code_spread``: largest code bucket, distinct codes, codewords used, entropy) and
warns when one code holds too much of the database (a collapsed head, "sink code"), since
codes-only retrieval cannot rank faces that share a code.

``codes="gallery"`` evaluates the codes ``opqn encode --codes gallery`` writes: a quantizer
trained, as encode trains it, on the database's first ``model.refine.TRAIN_SAMPLE`` faces, whose tables
score the queries (``pipelines.encode.quantizers``).
"""
from __future__ import annotations

import logging
import time

import torch
import torch.nn.functional as F

from model.code_spread import code_spread, mixed_bucket, sink_warning
from model.features import embed
from model.metrics import retrieval_metrics
from model.refine import CODE_SOURCES, TRAIN_SAMPLE, train_gallery_codes
from model.scoring import lut_scores
from model.registry import Method, method_of
from pipelines.evaluate.protocols import check_split, is_shard_dataset, load_split
from pipelines.evaluate.report import write_report
from pipelines.formats.checkpoint import checkpoint_method, load_checkpoint, model_from_checkpoint, stored_size
from pipelines.formats.faces import FaceSet

log = logging.getLogger(__name__)

DEFAULT_TS = (1, 5, 10, 20, 50, 100, 200, 500)
TRAIN_TS = (1, 5, 10, 20, 50, 100)  # P@T of the trainers' end-of-run summary


def evaluate_model(model: torch.nn.Module, queries: FaceSet, database: FaceSet, ts=DEFAULT_TS,
                   method: Method | None = None, pr_points: int = 100, codes: str = "model") -> dict:
    """Compact-code retrieval metrics and the float-feature upper bound of the same model.

    Returns ``{"method", "label", "bits", "ranking", "quantized": metrics, "float": metrics,
    "distinct_database_codes", "code_spread", "warnings"}`` where metrics are
    ``model.metrics.retrieval_metrics`` dicts (mAP over the full ranking, P@T, PR curve; ties by
    database index ascending), ``code_spread`` is ``model.code_spread.code_spread`` of the
    database codes (K = 2 for DCDH's sign bits) and ``warnings`` holds the sink-code warning
    (``model.code_spread.sink_warning``) when one code holds too much of the database.
    """
    check_split(queries, database)
    method = method or method_of(model)
    quant, flt, spread, db_codes = _evaluate(model, queries, database, ts, pr_points, codes)
    spread.update(mixed_bucket(db_codes.numpy(), database.labels))
    warning = sink_warning(spread)
    return {"method": method.name, "label": method.label, "bits": int(round(model.cfg.bits)), "ranking": method.ranking,
            "quantized": quant, "float": flt, "distinct_database_codes": spread["distinct_codes"],
            "code_spread": spread, "codes": codes, "warnings": [warning] if warning else []}


@torch.no_grad()
def _evaluate(model: torch.nn.Module, queries: FaceSet, database: FaceSet, ts,
              pr_points: int = 100, codes: str = "model") -> tuple[dict, dict, dict, torch.Tensor]:
    """(compact-code metrics, float-feature metrics, spread of the database codes, those codes)."""
    if codes not in CODE_SOURCES:
        raise ValueError(f"codes must be one of {CODE_SOURCES}, got {codes!r}")
    model.eval()
    xq, xd = embed(model, queries.images), embed(model, database.images)
    nd = F.normalize(xd, dim=1)
    cos = F.normalize(xq, dim=1) @ nd.T
    if codes == "gallery":
        quantizer = train_gallery_codes(nd[:TRAIN_SAMPLE].numpy(), model.cfg.M, getattr(model.cfg, "K", 2))
        db_codes = torch.from_numpy(quantizer.encode(nd.numpy()))
        scores = lut_scores(torch.from_numpy(quantizer.tables(xq.numpy())), db_codes)
    else:
        db_codes = model.codes_from_features(xd)
        scores = model.scores(xq, db_codes)
    quant = retrieval_metrics(scores.numpy(), queries.labels, database.labels, ts, pr_points=pr_points)
    flt = retrieval_metrics(cos.numpy(), queries.labels, database.labels, ts, pr_points=pr_points)
    return quant, flt, code_spread(db_codes.numpy(), getattr(model.cfg, "K", 2)), db_codes


def train_summary(model: torch.nn.Module, queries: FaceSet, database: FaceSet, ts=TRAIN_TS) -> dict:
    """The trainers' end-of-run metrics, flat: ``map``, ``p5``, ``precision_at``, ``map_float``,
    ``p5_float``, ``queries``, ``database``, ``pr``, ``pr_float``, the database codes' spread
    (``code_spread``, with ``largest_bucket``, ``code_entropy_bits`` and
    ``codewords_used_per_subspace`` also at the top level)."""
    # no split check: a trainer reports whatever its query set gives rather than fail after training
    quant, flt, spread, _ = _evaluate(model, queries, database, ts)
    return {
        "map": quant["map"], "p5": quant["precision_at"].get(5), "precision_at": quant["precision_at"],
        "map_float": flt["map"], "p5_float": flt["precision_at"].get(5),
        "queries": quant["queries"], "database": quant["database"],
        "codewords_used_per_subspace": spread["codewords_used_mean"], "pr": quant["pr"], "pr_float": flt["pr"],
        "largest_bucket": spread["largest_bucket"], "code_entropy_bits": spread["code_entropy_bits"],
        "code_spread": spread,
    }


def load_model(url: str, expect_method: str | None = None) -> tuple[torch.nn.Module, Method, dict]:
    """(network, method, checkpoint state) of a checkpoint URL, of any method."""
    state = load_checkpoint(url)
    return model_from_checkpoint(state, expect_method), checkpoint_method(state), state


def evaluate_url(model_url: str | list[str], dataset: str, report_dir: str | None = None, protocol: str = "single",
                 method: str | None = None, crop_fraction: float | None = None, min_photos: int | None = None,
                 max_photos: int | None = None, query_fraction: float | None = None, queries_per_identity: int = 1,
                 seed: int | None = None, ts=DEFAULT_TS, threads: int = 2, allow_seen: bool = False,
                 codes: str = "model") -> dict:
    """Load checkpoint(s), split ``dataset`` by ``protocol``, evaluate, and write one report.

    ``model_url`` is one URL, a comma-separated list or a list: several models (e.g. OPQN and
    its baselines) are evaluated on the same split and drawn on the same plots; they must share
    the input image size. Unset split options default to the first checkpoint's training
    settings (crop fraction, except 1.0 for face shards, which hold aligned crops; minimum
    photos; query fraction; seed), so the single-domain split of the training folder reproduces
    the trainer's query/database split. For the cross protocol the dataset's identities must be
    unseen by every model unless ``allow_seen``.
    """
    t0 = time.monotonic()
    urls = [u for u in model_url.split(",") if u] if isinstance(model_url, str) else list(model_url)
    if not urls:
        raise ValueError("no model URL given")
    loaded = [load_model(u, method) for u in urls]
    sizes = {m.cfg.image_size for m, _, _ in loaded}
    if len(sizes) > 1:
        raise ValueError(f"the models take different image sizes {sorted(sizes)}; evaluate them separately")
    model, meth, state = loaded[0]
    train = state.get("train") or {}
    split = load_split(
        dataset, protocol, stored_size=stored_size(state),
        crop_fraction=crop_fraction if crop_fraction is not None else (
            1.0 if is_shard_dataset(dataset) else float(train.get("crop_fraction", 0.5))),
        min_photos=min_photos if min_photos is not None else (int(train.get("min_photos", 10)) if protocol == "single" else 2),
        max_photos=max_photos,
        query_fraction=query_fraction if query_fraction is not None else float(train.get("query_fraction", 0.2)),
        queries_per_identity=queries_per_identity,
        seed=seed if seed is not None else int(train.get("seed", 0)), threads=threads)
    if protocol == "cross" and not allow_seen:
        for url, (_, _, st) in zip(urls, loaded):
            seen = sorted(set(st.get("classes") or []) & set(split.database.labels.tolist()))
            if seen:
                raise ValueError(f"cross-domain evaluation needs identities the model never saw, but {len(seen)} "
                                 f"were in the training set of {url}, e.g. {seen[:5]}")
    results = []
    for url, (m, mt, st) in zip(urls, loaded):
        r = evaluate_model(m, split.queries, split.database, ts, mt, codes=codes)
        for warning in r["warnings"]:
            log.warning("%s: %s", url, warning)
        results.append({**r, "model_url": url, "model_id": st.get("model_id")})
    first = results[0]
    title = (f"{meth.label} {first['bits']} bit" if len(results) == 1 else f"{len(results)} models") + f", {protocol}-domain"
    context = {"title": title, "model_url": ",".join(urls), "model_id": ",".join(str(r["model_id"]) for r in results),
               "dataset": str(dataset), "protocol": protocol, "split": split.description, "codes": codes,
               "database_order": ("face shards in file-name order, then row" if split.source == "shards"
                                  else "identity, then file path (sorted)"),
               "seconds": round(time.monotonic() - t0, 1)}
    if report_dir:
        context["files"] = write_report(report_dir, results, context)
    return {"context": context, "result": first, "results": results}

