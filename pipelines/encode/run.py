"""Driver of gallery encoding: which source shards are new, Ray Data to encode them, commits.

Work is committed in whole source shards: a source shard's code shard(s), with
``store_features`` the paired feature shard(s) and with ``refine_bytes`` the paired refine
shard(s) (``pipelines.gallery``), its rejects and its watermark entry (``encoded_sources``) go
into the gallery manifest in the same atomic commit. A gallery's refine quantizer is trained
by its first encode with refine codes (``pipelines.encode.refine``) and listed in that run's
commits, so no refine shard is ever listed without it.
Source shards that finish close together share one commit (``commit_seconds``): every commit
rewrites the manifest, so one commit per source shard made a gallery of many small shards
quadratic (2,000 commits took 32 s of manifest writing, docs/results.md). A run killed at any
point leaves only whole source shards committed, and the next run encodes exactly the rest;
a run with nothing new writes nothing.
"""
from __future__ import annotations

import os
import signal
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, replace

import numpy as np
import pyarrow as pa

from pipelines.checkpoint import load_checkpoint, require_opqn
from pipelines.encode.encoder import Encoder
from pipelines.encode.refine import RefineSetup, prepare_refine
from pipelines.faces import arrow_filesystem, face_shards, read_face_columns
from pipelines.gallery import (CODES_DIR, FEATURES_DIR, REFINE_DIR, code_schema, feature_table, gallery_metadata,
                               open_gallery, refine_table, write_paired_shard)
from pipelines.progress import Progress, format_seconds
from storage.manifest import Manifest, commit, write_data_file

REJECT_SCHEMA = pa.schema([("face_id", pa.string()), ("source", pa.string()), ("reason", pa.string())])


@dataclass
class EncodeConfig:
    splits: tuple = ()  # face splits to encode; empty = every face
    batch_size: int = 256
    shard_rows: int = 1_000_000  # most rows per code shard
    actors: int = 0  # encoder actors, each loading the model once; 0 = cluster CPUs / threads - 1 (min 1)
    threads_per_actor: int = 1
    use_gpu: bool = False
    max_sources: int = 0  # encode at most this many new source shards in this run (0: all)
    # also store each face's l2-normalised float feature (float16, 2*D bytes a face) in
    # <gallery>/features/ for `opqn query --rerank`; fixed for a gallery by its first encode
    store_features: bool = False
    # also store a refine code of B bytes per face (a product quantizer of the normalised float
    # feature, model.refine) in <gallery>/refine/ for `opqn query --refine`; 0: none. Fixed
    # for a gallery by its first encode, which trains the quantizer on its first faces
    refine_bytes: int = 0
    refine_dim: int = 0  # dimension the feature is projected to before the refine PQ (0: min(4 B, D))
    refine_sample: int = 50_000  # faces the refine quantizer is trained on (the first ones encoded)
    # finished source shards are committed together at most this often (seconds); 0 commits
    # each as soon as it is complete. Longer: fewer manifest rewrites, more redone after a crash
    commit_seconds: float = 10.0


def codebook_scheme(state: dict) -> str:
    return "learned" if state["config"].get("learn_codebooks") else "dct-orthonormal"


def plan(model_url: str, dataset: str, gallery_url: str, cfg: EncodeConfig):
    """Check model against gallery and list the source shards still to encode, with row counts."""
    state = require_opqn(load_checkpoint(model_url), model_url)
    c = state["config"]
    gallery = open_gallery(gallery_url)
    if gallery is not None:
        gallery.check_model(state["model_id"], c["D"], c["M"], c["K"])
        gallery.check_features(cfg.store_features)
        gallery.check_refine(cfg.refine_bytes)
    done = gallery.encoded_sources if gallery else {}
    todo, stale = [], []
    for url, key, fingerprint in face_shards(dataset):
        if key not in done:
            todo.append((url, key, fingerprint))
        elif done[key] != fingerprint:
            stale.append(key)
    if stale:
        raise ValueError(f"source shards {stale[:3]} of {dataset} changed since they were encoded into {gallery_url}; "
                         f"face shards are immutable: write changes as new shards, or encode into a new gallery")
    if cfg.max_sources:
        todo = todo[:cfg.max_sources]
    expected = {}
    for url, key, _ in todo:
        splits = read_face_columns([url], ("split",)).column("split").to_pylist()
        expected[key] = sum(1 for s in splits if not cfg.splits or s in cfg.splits)
    return state, gallery, todo, expected


def _write_source(gallery_url: str, state: dict, key: str, chunks: list[dict],
                  cfg: EncodeConfig) -> tuple[list, int, int]:
    """Write one source shard's code (and feature, refine) shards and rejects, not yet listed anywhere.

    Returns the manifest entries to commit, the faces encoded and the faces rejected.
    """
    c = state["config"]
    schema = code_schema(c["M"], c["K"])
    face_id, identity, reject = (_column(chunks, name, (0,), object) for name in ("face_id", "identity", "reject"))
    codes = _column(chunks, "codes", (0, c["M"]), np.uint8)
    ok = reject == ""
    order = np.argsort(face_id[ok], kind="stable")  # stable row order whatever the batch arrival order
    entries = []
    fid, ident, cds = face_id[ok][order], identity[ok][order], codes[ok][order]
    paired = []  # (directory, rows in shard order, table builder) of each paired shard kind
    if cfg.store_features:
        paired.append((FEATURES_DIR, _column(chunks, "features", (0, c["D"]), np.float16)[ok][order],
                       lambda ids, rows: feature_table(ids, rows, c["D"])))
    if cfg.refine_bytes:
        paired.append((REFINE_DIR, _column(chunks, "refine", (0, cfg.refine_bytes), np.uint8)[ok][order],
                       lambda ids, rows: refine_table(ids, rows, cfg.refine_bytes)))
    for start in range(0, len(fid), cfg.shard_rows):
        sl = slice(start, start + cfg.shard_rows)
        flat = pa.array(cds[sl].reshape(-1), type=schema.field("codes").type.value_type)
        table = pa.table({"face_id": pa.array(fid[sl].tolist(), pa.string()),
                          "identity": pa.array(ident[sl].tolist(), pa.string()),
                          "codes": pa.FixedSizeListArray.from_arrays(flat, c["M"])}, schema=schema)
        entry = write_data_file(gallery_url, table, subdir=CODES_DIR, schema=schema)
        entries.append(entry)
        for directory, rows, make_table in paired:  # paired shards: same rows, same order, same commit
            entries.append(write_paired_shard(gallery_url, entry, make_table(fid[sl].tolist(), rows[sl]), directory))
    if (~ok).any():
        rej = pa.table({"face_id": face_id[~ok].tolist(), "source": [key] * int((~ok).sum()),
                        "reason": reject[~ok].tolist()}, schema=REJECT_SCHEMA)
        entries.append(write_data_file(gallery_url, rej, subdir="rejects", schema=REJECT_SCHEMA))
    return entries, int(ok.sum()), int((~ok).sum())


def _column(chunks: list[dict], name: str, empty_shape: tuple, dtype) -> np.ndarray:
    return np.concatenate([ch[name] for ch in chunks]) if chunks else np.zeros(empty_shape, dtype=dtype)


def _commit_sources(gallery_url: str, state: dict, written: list[tuple[str, str, list]], cfg: EncodeConfig,
                    refine: RefineSetup | None = None) -> None:
    """List the written files of whole source shards, with their watermarks, in one atomic commit.

    ``written``: (source key, fingerprint, manifest entries) per source shard. ``refine``: the
    run's refine quantizer, listed (with the manifest's ``refine`` entry) if not yet listed.
    """
    c = state["config"]
    meta = gallery_metadata(state["model_id"], c["D"], c["M"], c["K"], codebook_scheme(state), {},
                            store_features=cfg.store_features, refine=refine.meta if refine else None)

    def change(current: Manifest) -> Manifest:
        metadata = dict(current.metadata) if current.metadata else dict(meta)
        if metadata.get("model_id") != state["model_id"]:
            raise ValueError(f"gallery {gallery_url} was encoded by model {metadata.get('model_id')} meanwhile")
        has_features = metadata.get("features") is not None
        if has_features != cfg.store_features:
            raise ValueError(f"gallery {gallery_url} was encoded {'with' if has_features else 'without'} float "
                             f"features meanwhile; a gallery is either with or without features")
        if (metadata.get("refine") or {}).get("quantizer") != (refine.quantizer if refine else None):
            raise ValueError(f"gallery {gallery_url} got {'another' if metadata.get('refine') else 'no'} refine "
                             f"quantizer meanwhile (a concurrent encode); run encode again")
        sources = dict(metadata.get("encoded_sources", {}))
        added = []
        for key, fingerprint, entries in written:
            if key in sources:  # a concurrent run committed this source first: add nothing twice
                continue
            sources[key] = fingerprint
            added += entries
        if len(sources) == len(metadata.get("encoded_sources", {})):
            return current
        if refine is not None and refine.entry is not None and current.file(refine.quantizer["path"]) is None:
            added.insert(0, refine.entry)  # the first commit with refine codes lists their quantizer
        metadata["encoded_sources"] = sources
        return replace(current, files=current.files + tuple(added), metadata=metadata)

    commit(gallery_url, change)


def _auto_actors(cfg: EncodeConfig) -> int:
    """Leave one CPU for reading and decoding, or the actors starve the read tasks."""
    import ray

    if cfg.use_gpu:
        return max(1, int(ray.cluster_resources().get("GPU", 1)))
    cpus = int(ray.cluster_resources().get("CPU", 1))
    return max(1, cpus // max(1, cfg.threads_per_actor) - 1)


def encode_gallery(model_url: str, dataset: str, gallery_url: str, cfg: EncodeConfig = EncodeConfig(),
                   out=None) -> dict:
    """Encode the dataset's not-yet-encoded face shards into the gallery; returns counts."""
    out = out or sys.stderr  # resolved per call: a stream captured at import may be closed later
    t0 = time.monotonic()
    state, gallery, todo, expected = plan(model_url, dataset, gallery_url, cfg)
    skipped = len(gallery.encoded_sources) if gallery else 0
    summary = {"gallery": gallery_url, "model_id": state["model_id"], "sources_encoded": 0,
               "sources_skipped": skipped, "faces": 0, "rejected": 0, "code_shards_written": 0, "commits": 0,
               "store_features": cfg.store_features, "refine_bytes": cfg.refine_bytes}
    if not todo:
        print(f"encode: nothing new in {dataset} for {gallery_url} ({skipped} source shard(s) already encoded)",
              file=out, flush=True)
        return summary
    import ray.data

    from pipelines.train.run import init_ray

    refine = prepare_refine(state, gallery, gallery_url, [url for url, _, _ in todo], cfg, out)
    init_ray()
    fingerprint = {key: fp for _, key, fp in todo}
    fs, _ = arrow_filesystem(todo[0][0])
    key_of = {arrow_filesystem(url)[1]: key for url, key, _ in todo}
    # One read task per source shard: a task that reads several files holds them all, and its
    # memory would then grow with the dataset instead of with the shard size. Ray Data's
    # DataSourceV2 Parquet reader (the default in 2.60) reads every file in one long task whose
    # memory grew with the gallery (2.1 GB at 1M faces, docs/results.md); the V1 reader
    # honours one task per file. The flag is read when the read is planned, so it is set
    # only around this call.
    ctx = ray.data.DataContext.get_current()
    v2, ctx.use_datasource_v2 = ctx.use_datasource_v2, False
    try:
        ds = ray.data.read_parquet(list(key_of), filesystem=fs, include_paths=True,
                                   override_num_blocks=len(key_of))
    finally:
        ctx.use_datasource_v2 = v2
    ds = ds.select_columns(["face_id", "identity", "split", "image", "path"])
    ds = ds.map_batches(Encoder, fn_constructor_kwargs={"model_url": model_url, "splits": tuple(cfg.splits),
                                                        "threads": cfg.threads_per_actor, "use_gpu": cfg.use_gpu,
                                                        "store_features": cfg.store_features,
                                                        "refine": {"gallery": gallery_url,
                                                                   "quantizer": refine.quantizer} if refine else None},
                        batch_size=cfg.batch_size, batch_format="numpy",
                        compute=ray.data.ActorPoolStrategy(size=cfg.actors or _auto_actors(cfg)),
                        num_cpus=cfg.threads_per_actor, num_gpus=1 if cfg.use_gpu else 0)
    total = sum(expected.values())
    print(f"encode: {total} faces in {len(todo)} new source shard(s) of {dataset} -> {gallery_url} "
          f"(model {state['model_id']}, {skipped} source shard(s) already encoded"
          f"{', with float16 features' if cfg.store_features else ''}"
          f"{f', with {cfg.refine_bytes}-byte refine codes' if cfg.refine_bytes else ''})", file=out, flush=True)
    progress = Progress(total, "faces", "encode", stream=out)
    buffers, received = defaultdict(list), defaultdict(int)
    columns = (("face_id", "identity", "codes", "reject") + (("features",) if cfg.store_features else ())
               + (("refine",) if cfg.refine_bytes else ()))

    # Fault injection for crash tests: SIGKILL this process right after the N-th commit.
    kill_after = int(os.environ.get("OPQN_FAULT_KILL_AFTER_COMMITS", "0"))
    pending, last_commit = [], time.monotonic()  # written, not yet committed source shards

    def flush(force: bool = False):
        nonlocal last_commit
        if not pending or (not force and time.monotonic() - last_commit < cfg.commit_seconds):
            return
        _commit_sources(gallery_url, state, [(k, f, e) for k, f, e, _, _ in pending], cfg, refine)
        for _, _, _, faces, rejected in pending:
            summary["sources_encoded"] += 1
            summary["faces"] += faces
            summary["rejected"] += rejected
            summary["code_shards_written"] += -(-faces // cfg.shard_rows)  # _write_source cuts every shard_rows
        pending.clear()
        last_commit = time.monotonic()
        summary["commits"] += 1
        if kill_after and summary["commits"] >= kill_after:
            os.kill(os.getpid(), signal.SIGKILL)

    def finish(key):
        entries, faces, rejected = _write_source(gallery_url, state, key, buffers.pop(key, []), cfg)
        pending.append((key, fingerprint[key], entries, faces, rejected))
        flush()

    for key in [k for k, n in expected.items() if n == 0]:
        finish(key)  # a shard with no face in the selected splits is still marked done
    for batch in ds.iter_batches(batch_format="numpy", batch_size=None):
        if not len(batch["face_id"]):
            continue
        keys = np.array([key_of[p] for p in batch["path"]], dtype=object)
        for key in np.unique(keys):
            sel = keys == key
            buffers[key].append({k: batch[k][sel] for k in columns})
            received[key] += int(sel.sum())
            if received[key] == expected[key]:
                finish(key)
        progress.update(len(keys))
    flush(force=True)
    missing = {k: expected[k] - received[k] for k in expected if expected[k] and received[k] != expected[k]}
    if missing:
        raise RuntimeError(f"encode: rows missing for source shards {missing}; nothing was committed for them")
    summary["seconds"] = time.monotonic() - t0
    print(f"encode done in {format_seconds(summary['seconds'])}: {summary['faces']} faces encoded, "
          f"{summary['rejected']} rejected, {summary['code_shards_written']} code shard(s) written, "
          f"{summary['sources_encoded']} source shard(s) new in {summary['commits']} commit(s), "
          f"{skipped} skipped as already encoded", file=out, flush=True)
    return summary
