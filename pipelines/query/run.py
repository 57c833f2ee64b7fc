"""The batch query driver: query tables from the model, shard groups scored on Ray, merged top-k.

``query_batch(model_url, gallery_url, queries_url, results_url, cfg)``:

1. Load the checkpoint and open the gallery; refuse a gallery encoded by another model (model
   id = the checkpoint's content hash) or with another (D, M, K), before any work.
2. Queries: a face-shard dataset (its rows with ``split == cfg.split``; the query id is the
   face id) or a local identity folder of already-cropped faces (``identity/photo.jpg``, centre
   crop ``cfg.crop_fraction``; the query id is ``identity/photo.jpg``). One table (M x K) per
   query: ``model.tables_from_features(embed(...))``. No queries: an empty result and a warning.
3. Consecutive code shards (manifest order) are grouped into tasks of about
   ``cfg.rows_per_task`` codes; each Ray task scans its shards one at a time
   (``scan.scan_shards``) and returns its top-k per query. At most ``cfg.max_in_flight`` tasks
   run at once and results are merged as they arrive, so memory is bounded by the shards in
   flight and the top-k tables, whatever the gallery size. Tombstoned faces are dropped.
4. Optional exact re-rank (``cfg.rerank = R >= top_k``, a gallery encoded with
   ``--store-features``): the scan keeps the top-R by the LUT score, each task attaches the
   exact cosine of the query's float feature with the stored feature of its candidates, and
   the top-k of the global top-R by that cosine are returned (``pipelines.query.rerank``).
   ``cfg.refine = R`` (a gallery encoded with ``--refine-bytes B``) does the same with the
   gallery's compact refine codes in place of the float features (``model.refine``);
   the two are alternatives.
5. Results (``RESULT_SCHEMA``), one Parquet file at ``results_url``: ``query_id, rank, face_id,
   score``; per query (in input order) rank 0 is the best; ordered by score desc, then the
   code's position in the gallery (shard index in manifest order, row in the shard), so ties
   are deterministic and the output is the same for any shard grouping, task count or
   re-sharding that keeps the codes' global order. With re-rank, ``score`` is the exact cosine
   (with refine: the refine score) and the same order (score desc, then gallery position) applies.
"""
from __future__ import annotations

import logging
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa

from pipelines.execution import EXECUTORS, start_ray
from pipelines.formats.checkpoint import load_checkpoint, model_from_checkpoint, require_opqn, stored_size
from pipelines.formats.gallery import deleted_ids, load_quantizer, require_gallery
from pipelines.progress import Progress, format_seconds
from pipelines.query.kernels import KERNELS, check_kernel, choose_kernel
from pipelines.query.rerank import Rescorer, check_depth, rerank_topk
from pipelines.query.scan import ScanSettings, scan_gallery
from pipelines.query.topk import ShardTask, empty_topk, group_shards
from storage import urls
from storage.tables import write_table

log = logging.getLogger(__name__)

RESULT_SCHEMA = pa.schema([("query_id", pa.string()), ("rank", pa.int32()), ("face_id", pa.string()),
                           ("score", pa.float32())])


@dataclass
class QueryConfig:
    top_k: int = field(default=100, metadata={"help": "results per query"})
    split: str = field(default="query", metadata={"help": "face-shard queries: rows of this split (\"\": every "
                                                           "row)"})
    crop_fraction: float = field(default=1.0, metadata={"help": "photo-folder queries: centre square of each "
                                                                 "photo used (1.0 for face crops)"})
    kernel: str = field(default="auto", metadata={"help": "scoring kernel: auto, torch, faiss, fastscan, numpy "
                                                           "(see pipelines.query.kernels)"})
    rows_per_task: int = field(default=4_000_000, metadata={"help": "codes per scan task (consecutive shards, "
                                                                     "at least one)"})
    shards_per_task: int = field(default=0, metadata={"help": "at most this many shards per scan task (0: no "
                                                               "limit)"})
    max_in_flight: int = field(default=0, metadata={"help": "scan tasks running or queued at once (0: 2 per CPU "
                                                             "of the cluster)"})
    threads_per_task: int = field(default=1, metadata={"help": "CPUs each scan task asks Ray for, and its "
                                                                "torch/faiss threads"})
    gpus_per_task: float = field(default=0.0, metadata={"help": "GPUs each scan task asks Ray for (the torch "
                                                                 "kernel then runs on it)"})
    batch_size: int = field(default=256, metadata={"help": "query images per forward pass"})
    executor: str = field(default="ray", metadata={"help": "ray (in-process, or the cluster of RAY_ADDRESS) or "
                                                            "local (no Ray)", "choices": EXECUTORS})
    progress_interval: float = field(default=5.0, metadata={"help": "seconds between progress lines"})
    rerank: int = field(default=0, metadata={
        "help": "exact re-rank: keep the PQ top-R (R >= --top-k), re-score them by the cosine of the float "
                "features (a gallery encoded with --store-features), return the top-k of those; 0: off"})
    refine: int = field(default=0, metadata={
        "help": "compact re-rank: the same with the gallery's refine codes (encoded with --refine-bytes B) in "
                "place of the float features; an alternative to --rerank; 0: off"})
    query_block: int = field(default=0, metadata={
        "help": "queries read, embedded and scored at once (0: as many as --memory-mb holds); a results "
                "dataset commits one file per block, the point a killed job resumes from"})
    memory_mb: int = field(default=1024, metadata={
        "help": "memory budget of one query block in the driver (decoded crops, query tables, top-k tables), "
                "which sets the block size when --query-block is 0; independent of the number of queries"})

    def __post_init__(self):
        if self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")
        check_depth(self.top_k, self.rerank)
        check_depth(self.top_k, self.refine, "refine")
        if self.rerank and self.refine:
            raise ValueError(f"rerank={self.rerank} and refine={self.refine} are alternatives: re-rank by the exact "
                             f"float features (--rerank) or by the compact refine codes (--refine), not both")
        if self.kernel not in KERNELS:
            raise ValueError(f"unknown kernel {self.kernel!r}; choose from {KERNELS}")
        if self.executor not in EXECUTORS:
            raise ValueError(f"executor must be 'ray' or 'local', got {self.executor!r}")
        if self.rows_per_task < 1 or self.threads_per_task < 1 or self.max_in_flight < 0:
            raise ValueError("rows_per_task and threads_per_task must be >= 1, max_in_flight >= 0")

    @property
    def depth(self) -> int:
        """PQ candidates kept per query: R when re-ranking (by features or refine codes), else top_k."""
        return self.rerank or self.refine or self.top_k


def load_queries(queries_url: str, split: str, size: int, crop_fraction: float = 1.0,
                 storage_options: dict | None = None):
    """(query ids, uint8 images (n, 3, size, size)); empty when no query matches."""
    import torch

    from pipelines.formats.faces import face_shard_files, is_face_dataset, load_face_dataset, read_face_columns
    from pipelines.photo_folder import IMAGE_EXTENSIONS, list_identity_folder, load_face_set

    empty = ([], torch.empty(0, 3, size, size, dtype=torch.uint8))
    if is_face_dataset(queries_url, storage_options):
        files = face_shard_files(queries_url, storage_options)
        present = set(read_face_columns(files, ("split",), storage_options).column("split").to_pylist())
        splits = [split] if split else sorted(s for s in present if s is not None)
        if not present & set(splits):
            log.warning("no queries: face dataset %s has no faces with split %r (splits present: %s)",
                        queries_url, split, sorted(s for s in present if s is not None))
            return empty
        faces = load_face_dataset(queries_url, splits, size, 1.0, storage_options)
        return list(faces.paths), faces.images
    if not urls.is_local(queries_url):
        raise FileNotFoundError(f"{queries_url} is not a face dataset (no faces/*.parquet); image-folder queries "
                                f"must be a local identity/photo tree")
    root = Path(urls.local_path(queries_url))
    if root.is_dir() and not any(p.suffix.lower() in IMAGE_EXTENSIONS for p in root.glob("*/*")):
        log.warning("no queries: image folder %s holds no identity/photo images", queries_url)
        return empty
    items = list_identity_folder(root, min_photos=1)
    faces = load_face_set(items, size, crop_fraction)
    return [str(Path(p).relative_to(root).as_posix()) for p in faces.paths], faces.images


def query_tables(model, images, batch_size: int) -> np.ndarray:
    return query_inputs(model, images, batch_size)[0]


def query_inputs(model, images, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(query tables (nq, M, K) float32, float features x (nq, D) float32) of the query images."""
    from model.features import embed

    if not len(images):
        return np.empty((0, model.cfg.M, model.cfg.K), np.float32), np.empty((0, model.cfg.D), np.float32)
    x = embed(model, images, batch_size)
    tables = model.tables_from_features(x).numpy().astype(np.float32)
    if not np.isfinite(tables).all():
        raise ValueError("the model produced non-finite query tables")
    return tables, x.numpy().astype(np.float32)


def results_table(best: pa.Table, query_ids: list[str]) -> pa.Table:
    """Top-k rows (query, score desc, shard, row order) -> the result contract."""
    q = best.column("query").to_numpy()
    rank = (np.arange(len(q)) - np.searchsorted(q, q, side="left")).astype(np.int32)
    return pa.table({"query_id": pa.array(query_ids, pa.string()).take(pa.array(q)), "rank": rank,
                     "face_id": best.column("face_id"), "score": best.column("score")}, schema=RESULT_SCHEMA)


def query_batch(model_url: str, gallery_url: str, queries_url: str, results_url: str,
                cfg: QueryConfig | None = None, storage_options: dict | None = None, out=None) -> dict:
    """Rank the gallery for every query; write the results; return a summary (see the module docstring).

    Progress lines and the summary line go to ``out`` (default: sys.stderr)."""
    cfg = cfg or QueryConfig()
    out = out or sys.stderr
    t0 = time.monotonic()
    state = require_opqn(load_checkpoint(model_url, storage_options), model_url)
    model = model_from_checkpoint(state)
    mc = model.cfg
    gallery = require_gallery(gallery_url, storage_options)
    gallery.check_model(state["model_id"], mc.D, mc.M, mc.K)
    if cfg.kernel != "auto":
        check_kernel(cfg.kernel, mc.K)
    if cfg.rerank and not gallery.has_features:
        raise ValueError(f"gallery {gallery_url} has no stored float features, so it cannot be re-ranked "
                         f"(rerank={cfg.rerank}): encode the gallery with --store-features (into a new gallery: "
                         f"a gallery keeps the setting of its first encode), or query without --rerank")
    if cfg.refine and not gallery.has_refine:
        raise ValueError(f"gallery {gallery_url} has no refine codes, so it cannot be re-ranked with them "
                         f"(refine={cfg.refine}): encode the gallery with --refine-bytes B (into a new gallery: a "
                         f"gallery keeps the setting of its first encode), or query without --refine"
                         f"{' (it stores float features: use --rerank)' if gallery.has_features else ''}")
    quantizer = load_quantizer(gallery, storage_options) if cfg.refine else None

    query_ids, images = load_queries(queries_url, cfg.split, stored_size(state), cfg.crop_fraction,
                                     storage_options)
    tables, features = query_inputs(model, images, cfg.batch_size)
    nq = len(query_ids)
    deleted = pa.array(sorted(deleted_ids(gallery, storage_options)), pa.string())
    paired = (gallery.feature_urls() if cfg.rerank else gallery.refine_urls() if cfg.refine
              else [None] * len(gallery.shards))
    shards = [ShardTask(i, urls.join(gallery.url, s.path), s.rows, paired[i])
              for i, s in enumerate(gallery.shards)]
    groups = group_shards(shards, cfg.rows_per_task, cfg.shards_per_task)
    kernel = choose_kernel(cfg.kernel, nq, mc.K)
    print(f"[query] {nq} queries, gallery {gallery_url}: {gallery.rows} codes in {len(shards)} shards "
          f"({len(groups)} tasks), {len(deleted)} deleted, top-{cfg.top_k}"
          f"{f' of the exact re-rank of the PQ top-{cfg.rerank}' if cfg.rerank else ''}"
          f"{f' of the {gallery.refine_bytes}-byte refine re-rank of the PQ top-{cfg.refine}' if cfg.refine else ''}"
          f", kernel {kernel}, "
          f"executor {cfg.executor}",
          file=out, flush=True)
    if nq and cfg.executor == "ray":
        start_ray()  # before the clock starts: the scan rate should not include Ray's start-up
    t_scan = time.monotonic()
    nodes: set = set()
    if nq == 0:
        log.warning("no queries in %s (split %r): writing an empty result to %s", queries_url, cfg.split, results_url)
        best = empty_topk()
    else:
        progress = Progress(len(shards), "shards", "query", cfg.progress_interval, out)
        rescorer = (Rescorer.exact(features) if cfg.rerank else Rescorer.refine(quantizer, features) if cfg.refine
                    else None)
        settings = ScanSettings(cfg.depth, cfg.kernel, storage_options,
                                threads=cfg.threads_per_task if cfg.executor == "ray" else 0)
        best = scan_gallery(tables, groups, deleted, settings, progress, executor=cfg.executor,
                            max_in_flight=cfg.max_in_flight, cpus_per_task=cfg.threads_per_task,
                            gpus_per_task=cfg.gpus_per_task, nodes=nodes, rescorer=rescorer)
        if rescorer is not None:
            best = rerank_topk(best, cfg.top_k)
    scan_seconds = time.monotonic() - t_scan
    results = results_table(best, query_ids)
    write_table(results_url, results, schema=RESULT_SCHEMA, storage_options=storage_options)
    seconds = time.monotonic() - t0
    codes_per_s = gallery.rows / scan_seconds if nq and scan_seconds > 0 else 0.0
    summary = {"queries": nq, "gallery_codes": gallery.rows, "deleted": len(deleted), "shards": len(shards),
               "tasks": len(groups) if nq else 0, "nodes": len(nodes), "top_k": cfg.top_k, "rerank": cfg.rerank,
               "refine": cfg.refine,
               "kernel": kernel,
               "result_rows": results.num_rows,
               "scan_seconds": round(scan_seconds, 3), "seconds": round(seconds, 3),
               "codes_per_s": codes_per_s, "scores_per_s": codes_per_s * nq, "results_url": results_url,
               "config": asdict(cfg)}
    print(f"query: {nq} queries x {gallery.rows} codes ({len(shards)} shards, {summary['tasks']} tasks, "
          f"{len(deleted)} deleted) -> {results.num_rows} results in {format_seconds(seconds)}; scan "
          f"{codes_per_s:,.0f} codes/s ({codes_per_s * nq:,.0f} scores/s, kernel {kernel}); {results_url}",
          file=out, flush=True)
    return summary
