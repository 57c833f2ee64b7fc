"""The batch query driver: query tables from the model, shard groups scored on Ray, merged top-k.

``query_batch(model_url, gallery_url, queries_url, results_url, cfg)``:

1. Load the checkpoint and open the gallery; refuse a gallery encoded by another model (model
   id = the checkpoint's content hash) or with another (D, M, K), before any work.
2. Queries: a face-shard dataset (its rows with ``split == cfg.split``; the query id is the
   face id) or a local identity folder of already-cropped faces (``identity/photo.jpg``, centre
   crop ``cfg.crop_fraction``; the query id is ``identity/photo.jpg``). One table (M x K) per
   query: ``model.tables_from_features(embed(...))``, or for a gallery with its own codes
   (``opqn encode --codes gallery``) its code quantizer's tables of the same feature
   (``model.refine.RefineQuantizer.tables``). No queries: an empty result and a warning.
   Queries go in blocks (``pipelines.query.source``) of ``cfg.query_block`` queries, or as many
   as ``cfg.memory_mb`` holds (``block_queries``): each block is scanned and written while the
   next one is read and embedded (in a thread), and no block is held longer, so memory does not
   grow with the number of queries. A
   block's tables and tombstones go to the object store once (``execution.run_tasks``'s
   ``shared``) and every scan task of the block reads them there. At most ``MAX_TOP_K``
   results (or re-rank candidates) per query.
3. Consecutive code shards (manifest order) are grouped into tasks of about
   ``cfg.rows_per_task`` codes (0: ``scan.task_count`` sizes them from the codes' bytes, the
   block's query count, the cluster's task slots and ``cfg.task_seconds``); each Ray task
   scans its shards one at a time, reading the next while scoring one (``scan.scan_shards``),
   and returns its top-k per query and its phase times. At most ``cfg.max_in_flight`` tasks
   run at once and results are merged as they arrive, so memory is bounded by the shards in
   flight and the top-k tables, whatever the gallery size. Tombstoned faces are dropped. The
   summary's ``phases`` says where the time went (``pipelines.query.account``).
4. Optional exact re-rank (``cfg.rerank = R >= top_k``, a gallery encoded with
   ``--store-features``): the scan keeps the top-R by the LUT score, each task attaches the
   exact cosine of the query's float feature with the stored feature of its candidates, and
   the top-k of the global top-R by that cosine are returned (``pipelines.query.rerank``).
   ``cfg.refine = R`` (a gallery encoded with ``--refine-bytes B``) does the same with the
   gallery's compact refine codes in place of the float features (``model.refine``);
   the two are alternatives.
5. Results (``pipelines.query.results``): ``results_url`` ending in ``.parquet`` is one Parquet
   file, written when the job ends; any other URL is a results dataset, one file per block
   committed as the block finishes, so a killed job resumes at its first uncommitted block and a
   re-run with nothing new does nothing. Rows ``query_id, rank, face_id, score``; per query (in input order) rank 0 is the best; ordered by score desc, then the
   code's position in the gallery (shard index in manifest order, row in the shard), so ties
   are deterministic and the output is the same for any shard grouping, task count or
   re-sharding that keeps the codes' global order. With re-rank, ``score`` is the exact cosine
   (with refine: the refine score) and the same order (score desc, then gallery position) applies.
"""
from __future__ import annotations

import logging
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

import numpy as np
import pyarrow as pa

from pipelines.execution import EXECUTORS, start_ray
from pipelines.execution import task_slots as cluster_task_slots
from pipelines.formats.checkpoint import load_checkpoint, model_from_checkpoint, require_opqn, stored_size
from pipelines.formats.gallery import deleted_ids, load_quantizer, require_gallery
from pipelines.progress import Progress, format_seconds, say
from pipelines.query.kernels import KERNELS, check_kernel, choose_kernel
from pipelines.query.rerank import Rescorer, check_depth, rerank_topk
from pipelines.query.results import ResultsDataset, is_single_file, results_table, write_results_file
from pipelines.query.account import ScanAccount
from pipelines.query.scan import ScanSettings, scan_gallery, task_count, warm_workers
from pipelines.query.source import add_ids, open_queries
from pipelines.query.topk import ShardTask, empty_topk, group_shards, split_shards
from storage import urls

log = logging.getLogger(__name__)

MAX_TOP_K = 10_000  # results (or re-rank candidates) per query: a block holds queries x this many rows


@dataclass
class QueryConfig:
    top_k: int = field(default=100, metadata={"help": "results per query"})
    split: str = field(default="query", metadata={"help": "face-shard queries: rows of this split (\"\": every "
                                                           "row)"})
    crop_fraction: float = field(default=1.0, metadata={"help": "photo-folder queries: centre square of each "
                                                                 "photo used (1.0 for face crops)"})
    kernel: str = field(default="auto", metadata={"help": "scoring kernel: auto, torch, faiss, fastscan, numpy "
                                                           "(see pipelines.query.kernels)"})
    rows_per_task: int = field(default=0, metadata={"help": "codes per scan task (consecutive shards, at least one); "
                                                           "0: from the codes' bytes, the block's query count and "
                                                           "--task-seconds (pipelines.query.scan.task_count)"})
    task_seconds: float = field(default=5.0, metadata={"help": "target seconds of one scan task when --rows-per-task "
                                                                "is 0 (shorter where the cluster's slots need more "
                                                                "tasks)"})
    shards_per_task: int = field(default=0, metadata={"help": "at most this many shards per scan task (0: no "
                                                               "limit)"})
    max_in_flight: int = field(default=0, metadata={"help": "scan tasks running at once (0: one per core of the "
                                                             "cluster and --threads-per-task)"})
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
        "help": "queries read, embedded and scored at once (0: as many as --memory-mb holds), rounded down to "
                "whole --batch-size batches so results do not depend on it; a results dataset commits one file "
                "per block, the point a killed job resumes from"})
    memory_mb: int = field(default=1024, metadata={
        "help": "memory budget of one query block in the driver (decoded crops, query tables, top-k tables), "
                "which sets the block size when --query-block is 0; independent of the number of queries"})

    def __post_init__(self):
        if self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")
        if self.depth > MAX_TOP_K:
            what = "rerank R" if self.rerank else "refine R" if self.refine else "top_k"
            raise ValueError(f"{what}={self.depth} is above the limit of {MAX_TOP_K} results per query: every "
                             f"query block holds queries x {what} rows in the driver and in each scan task; ask "
                             f"for at most {MAX_TOP_K}")
        if self.query_block < 0 or self.memory_mb < 1:
            raise ValueError(f"query_block must be >= 0 (0: from memory_mb) and memory_mb >= 1, got "
                             f"{self.query_block} and {self.memory_mb}")
        check_depth(self.top_k, self.rerank)
        check_depth(self.top_k, self.refine, "refine")
        if self.rerank and self.refine:
            raise ValueError(f"rerank={self.rerank} and refine={self.refine} are alternatives: re-rank by the exact "
                             f"float features (--rerank) or by the compact refine codes (--refine), not both")
        if self.kernel not in KERNELS:
            raise ValueError(f"unknown kernel {self.kernel!r}; choose from {KERNELS}")
        if self.executor not in EXECUTORS:
            raise ValueError(f"executor must be 'ray' or 'local', got {self.executor!r}")
        if self.rows_per_task < 0 or self.threads_per_task < 1 or self.max_in_flight < 0 or self.task_seconds <= 0:
            raise ValueError(f"rows_per_task must be >= 0 (0: from task_seconds), task_seconds > 0, threads_per_task "
                             f">= 1 and max_in_flight >= 0, got {self.rows_per_task}, {self.task_seconds}, "
                             f"{self.threads_per_task} and {self.max_in_flight}")

    @property
    def depth(self) -> int:
        """PQ candidates kept per query: R when re-ranking (by features or refine codes), else top_k."""
        return self.rerank or self.refine or self.top_k


def query_tables(model, images, batch_size: int, codebook=None) -> np.ndarray:
    return query_inputs(model, images, batch_size, codebook)[0]


def query_inputs(model, images, batch_size: int, codebook=None) -> tuple[np.ndarray, np.ndarray]:
    """(query tables (nq, M, K) float32, float features x (nq, D) float32) of the query images;
    the tables of ``codebook`` (a gallery's code quantizer) instead of the model's when given.

    Features and tables are computed batch by batch: their float rounding then depends only on
    the batch a query is in, not on how many queries are embedded in one call."""
    import torch

    from model.features import embed

    tables = np.empty((len(images), model.cfg.M, model.cfg.K), np.float32)
    features = np.empty((len(images), model.cfg.D), np.float32)
    for b0 in range(0, len(images), batch_size):
        x = embed(model, images[b0:b0 + batch_size], batch_size)
        with torch.no_grad():
            tables[b0:b0 + len(x)] = (codebook.tables(x.numpy()) if codebook is not None
                                      else model.tables_from_features(x).numpy())
        features[b0:b0 + len(x)] = x.numpy()
    if not np.isfinite(tables).all():
        raise ValueError("the model produced non-finite query tables")
    return tables, features


def block_queries(cfg: QueryConfig, size: int, M: int, K: int, D: int) -> int:
    """Queries per block: ``cfg.query_block``, or what ``cfg.memory_mb`` holds at about
    3 S^2 bytes of decoded crop, 2 x 4 M K of table (the driver's and the object store's copy),
    8 D of features and 4 x 64 bytes per top-k row (a task's result, the running merge, the
    block's results and its Parquet buffer) per query, for two blocks: the one being scanned
    and the next one, read and embedded meanwhile.

    A block is a whole number of ``cfg.batch_size`` forward batches (rounded down; a block
    smaller than one batch is embedded as one batch of its size): the forward pass's float
    rounding depends on the batch a query is in, so whole batches keep every query's table, and
    with it the results, the same whatever the block size and wherever a resumed job starts."""
    per_query = 3 * size * size + 8 * M * K + 8 * D + 4 * 64 * cfg.depth
    n = cfg.query_block or cfg.memory_mb * 2**20 // (2 * per_query)  # the block scanned and the next one read
    if n >= cfg.batch_size:
        n -= n % cfg.batch_size
    return max(1, n)


def result_key(state: dict, gallery, cfg: QueryConfig) -> dict:
    """What a results dataset's rows depend on: a resumed run must match it."""
    return {"model_id": state["model_id"], "gallery": gallery.url, "gallery_generation": gallery.generation,
            "top_k": cfg.top_k, "rerank": cfg.rerank, "refine": cfg.refine, "split": cfg.split,
            "crop_fraction": cfg.crop_fraction}


def check_gallery(gallery, cfg: QueryConfig, gallery_url: str) -> None:
    """Refuse a re-rank the gallery has nothing stored for."""
    if cfg.rerank and not gallery.has_features:
        raise ValueError(f"gallery {gallery_url} has no stored float features, so it cannot be re-ranked "
                         f"(rerank={cfg.rerank}): encode the gallery with --store-features (into a new gallery: "
                         f"a gallery keeps the setting of its first encode), or query without --rerank")
    if cfg.refine and not gallery.has_refine:
        raise ValueError(f"gallery {gallery_url} has no refine codes, so it cannot be re-ranked with them "
                         f"(refine={cfg.refine}): encode the gallery with --refine-bytes B (into a new gallery: a "
                         f"gallery keeps the setting of its first encode), or query without --refine"
                         f"{' (it stores float features: use --rerank)' if gallery.has_features else ''}")


def query_batch(model_url: str, gallery_url: str, queries_url: str, results_url: str,
                cfg: QueryConfig | None = None, storage_options: dict | None = None, out=None) -> dict:
    """Rank the gallery for every query, block by block; write the results; return a summary
    (see the module docstring). Progress lines and the summary line go to ``out`` (default: sys.stderr)."""
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
    check_gallery(gallery, cfg, gallery_url)
    quantizer = load_quantizer(gallery, storage_options) if cfg.refine else None
    codebook = load_quantizer(gallery, storage_options, "codebook") if gallery.codebook_meta is not None else None
    size = stored_size(state)
    source = open_queries(queries_url, cfg.split, size, cfg.crop_fraction, storage_options)
    dataset = None if is_single_file(results_url) else ResultsDataset(results_url, result_key(state, gallery, cfg),
                                                                       storage_options)
    start = dataset.done if dataset else 0
    hasher = source.hasher(start)
    if dataset:
        dataset.check_prefix(hasher.hexdigest())
    deleted = pa.array(sorted(deleted_ids(gallery, storage_options)), pa.string())
    paired = (gallery.feature_urls() if cfg.rerank else gallery.refine_urls() if cfg.refine
              else [None] * len(gallery.shards))
    shards = [ShardTask(i, urls.join(gallery.url, s.path), s.rows, paired[i]) for i, s in enumerate(gallery.shards)]
    block = block_queries(cfg, size, mc.M, mc.K, mc.D)
    todo = max(0, source.count - start)
    n_blocks = -(-todo // block)
    account, warm, slots = ScanAccount(), None, 1
    if todo and cfg.executor == "ray":
        start_ray()  # before the clock starts: the scan rate should not include Ray's start-up
        slots = task_slots(cfg)
        warm = warm_workers(slots, cfg.threads_per_task, cfg.gpus_per_task, account)  # while queries are embedded
    if cfg.rows_per_task:
        groups = group_shards(shards, cfg.rows_per_task, cfg.shards_per_task)
    else:
        tasks = task_count(gallery.rows, stored_bytes_per_code(gallery), min(block, todo), slots, cfg.task_seconds)
        groups = split_shards(shards, tasks, cfg.shards_per_task)
    rows_per_task = max((sum(s.rows for s in g) for g in groups), default=0)
    kernel = choose_kernel(cfg.kernel, min(block, todo), mc.K)
    say("query", f"[query] {source.count} queries{f' ({start} answered before)' if start else ''}, gallery "
        f"{gallery_url}: {gallery.rows} {gallery.codes_source} codes in {len(shards)} shards ({len(groups)} tasks, "
        f"{slots} at once), "
        f"{len(deleted)} deleted, top-{cfg.top_k}"
        f"{f' of the exact re-rank of the PQ top-{cfg.rerank}' if cfg.rerank else ''}"
        f"{f' of the {gallery.refine_bytes}-byte refine re-rank of the PQ top-{cfg.refine}' if cfg.refine else ''}"
        f", kernel {kernel}, executor {cfg.executor}, {n_blocks} block{'s' * (n_blocks != 1)} of up to {block} "
        f"queries", out)
    if not source.count:
        log.warning("no queries in %s (split %r): writing an empty result to %s", queries_url, cfg.split, results_url)
    run = {"queries": 0, "blocks": 0, "scan_seconds": 0.0, "rows_per_task": rows_per_task, "account": account,
           "slots": slots}
    settings = ScanSettings(cfg.depth, cfg.kernel, storage_options,
                            threads=cfg.threads_per_task if cfg.executor == "ray" else 0)

    def embedded():
        blocks = source.blocks(start, block)
        while True:
            t = time.perf_counter()
            if (qblock := next(blocks, None)) is None:
                return
            item = (qblock, *query_inputs(model, qblock.images, min(cfg.batch_size, block), codebook))
            run["account"].add("embed_s", time.perf_counter() - t)
            yield item

    def answered():
        """(block, its result table), block by block; the next block is read and embedded in a
        thread while this one is scanned, so at most two blocks' queries are in memory."""
        with ThreadPoolExecutor(1) as pool:
            blocks = embedded()
            ahead, b = pool.submit(next, blocks, None), 0
            while (item := ahead.result()) is not None:
                ahead = pool.submit(next, blocks, None)
                yield scanned(b, *item)
                b += 1

    def scanned(b, qblock, tables, features):
        t_scan = time.monotonic()
        if warm is not None and b == 0:  # every slot's worker up: the first block's tasks spread over all nodes
            warm.result()
            account.add("warmup_wait_s", time.monotonic() - t_scan)
        label = "query" if n_blocks == 1 else f"query {b + 1}/{n_blocks}"
        best = scan_block(tables, features, groups, deleted, settings, cfg, quantizer,
                          Progress(len(shards), "shards", label, cfg.progress_interval, out), run["account"], slots)
        run["scan_seconds"] += time.monotonic() - t_scan
        run["queries"] += len(qblock.ids)
        run["blocks"] += 1
        add_ids(hasher, qblock.all_ids)
        return qblock, results_table(best, qblock.ids)

    if dataset is None:
        rows = write_results_file(results_url, (r for _, r in answered()), storage_options)
        total = run["queries"]
    else:
        for qblock, results in answered():
            dataset.commit_block(results, qblock.start, qblock.end, len(qblock.ids), hasher.hexdigest())
        dataset.commit_empty()
        rows, total = dataset.rows, dataset.queries
    return summarize(run, total, rows, gallery, shards, groups, deleted, cfg, kernel, results_url,
                     time.monotonic() - t0, out)


def stored_bytes_per_code(gallery) -> float:
    """Bytes in storage per code of the gallery's code shards (face id and identity included)."""
    return sum(s.size for s in gallery.shards) / max(gallery.rows, 1)


def task_slots(cfg: QueryConfig) -> int:
    """Scan tasks that run at once: 1 in this process, else ``cfg.max_in_flight`` or the cluster's
    cores (or GPUs) per task (a local Ray's spare CPU left out: the scan is CPU-bound)."""
    if cfg.executor != "ray":
        return 1
    return cfg.max_in_flight or cluster_task_slots(cfg.threads_per_task, cfg.gpus_per_task, cores_only=True)


def scan_block(tables, features, groups, deleted, settings: ScanSettings, cfg: QueryConfig, quantizer,
               progress: Progress, account: ScanAccount, slots: int) -> pa.Table:
    """The top-k table of one block of queries over the whole gallery (re-ranked when asked)."""
    rescorer = (Rescorer.exact(features) if cfg.rerank else Rescorer.refine(quantizer, features) if cfg.refine
                else None)
    if not len(tables):
        return empty_topk()
    best = scan_gallery(tables, groups, deleted, settings, progress, executor=cfg.executor,
                        max_in_flight=slots, cpus_per_task=cfg.threads_per_task,
                        gpus_per_task=cfg.gpus_per_task, account=account, rescorer=rescorer)
    return rerank_topk(best, cfg.top_k) if rescorer is not None else best


def summarize(run: dict, total: int, rows: int, gallery, shards, groups, deleted, cfg: QueryConfig, kernel: str,
              results_url: str, seconds: float, out) -> dict:
    """The summary dict and line: ``queries`` counts every query answered in ``results_url``
    (earlier runs' too, for a results dataset); the rates and ``new_queries`` only this run's."""
    nq, scan_seconds = run["queries"], run["scan_seconds"]
    codes_per_s = gallery.rows * run["blocks"] / scan_seconds if nq and scan_seconds > 0 else 0.0
    scores_per_s = gallery.rows * nq / scan_seconds if nq and scan_seconds > 0 else 0.0
    tasks = len(groups) * run["blocks"] if nq else 0
    account = run["account"]
    kernel = "+".join(sorted(account.kernels)) or kernel  # what the tasks used (auto: per block)
    nodes = len(account.node_tasks) if cfg.executor == "ray" else 0
    summary = {"queries": total, "new_queries": nq, "blocks": run["blocks"], "gallery_codes": gallery.rows,
               "deleted": len(deleted), "shards": len(shards), "tasks": tasks, "task_slots": run["slots"],
               "nodes": nodes,
               "rows_per_task": run["rows_per_task"], "top_k": cfg.top_k, "rerank": cfg.rerank,
               "refine": cfg.refine, "kernel": kernel, "result_rows": rows, "scan_seconds": round(scan_seconds, 3),
               "seconds": round(seconds, 3), "codes_per_s": codes_per_s, "scores_per_s": scores_per_s,
               "phases": account.to_dict(), "results_url": results_url, "config": asdict(cfg)}
    blocks = f" ({run['blocks']} blocks)" if run["blocks"] > 1 else ""
    say("query", f"query: {nq} queries x {gallery.rows} codes ({len(shards)} shards, {tasks} tasks, {len(deleted)} "
        f"deleted) -> {rows} results in {format_seconds(seconds)}{blocks}"
        f"; scan {codes_per_s:,.0f} codes/s ({scores_per_s:,.0f} scores/s, kernel {kernel}); {results_url}", out)
    if nq:
        say("query", f"query: scan time: {account.describe()}", out)
    return summary
