"""Driver of gallery encoding: which source shards are new, one task each to encode them, commits.

Each new source face shard is one task (``pipelines.encode.encoder.encode_source``, run by
``pipelines.execution.run_tasks`` with at most ``actors`` in flight): it encodes the shard with the
planned model and writes its code shard(s), with ``store_features`` the paired feature shard(s)
and with ``refine_bytes`` the paired refine shard(s), and its rejects (``pipelines.formats``).
The driver lists them, with the source's watermark entry (``encoded_sources``), in the gallery
manifest in one atomic commit (``gallery_writer.commit_sources``). A gallery's refine quantizer
is trained by its first encode with refine codes (``pipelines.encode.quantizers``) and listed in
that run's commits, so no refine shard is ever listed without it; so is the quantizer of a
gallery's own codes (``codes="gallery"``), and every task then writes that quantizer's codes
instead of the model's.
Source shards that finish close together share one commit (``commit_seconds``,
``pipelines.commit_groups``): every commit rewrites the manifest, so one commit per source shard
made a gallery of many small shards quadratic (docs/results.md, *Data safety*). A run killed at any
point leaves only whole source shards committed, and the next run encodes exactly the rest;
a run with nothing new writes nothing.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field

from model.refine import CODE_SOURCES, TRAIN_SAMPLE
from pipelines.commit_groups import CommitGroups
from pipelines.encode.encoder import EncodeJob, encode_source, model_state
from pipelines.encode.quantizers import prepare_quantizers
from pipelines.execution import EXECUTORS, run_tasks, start_ray
from pipelines.formats.checkpoint import load_checkpoint, require_opqn
from pipelines.formats.face_erasure import encoded_key, record_gallery, replaced_keys
from pipelines.formats.faces import face_shards, read_face_columns
from pipelines.formats.gallery import erased_hashes, gallery_metadata, open_gallery
from pipelines.formats.gallery_writer import commit_sources
from pipelines.progress import Progress, format_seconds, say
from storage import lease, urls


@dataclass
class EncodeConfig:
    splits: tuple = field(default=(), metadata={"help": "face splits to encode (e.g. database); empty: every face"})
    batch_size: int = field(default=256, metadata={"help": "faces per forward pass"})
    shard_rows: int = field(default=1_000_000, metadata={"help": "most rows per code shard"})
    actors: int = field(default=0, metadata={
        "help": "source shards in flight: at most this many encode tasks (one per source shard, each worker "
                "holding the model) running or queued at once; 0: two per task slot of the cluster, a slot "
                "being --threads-per-actor CPUs"})
    threads_per_actor: int = field(default=1, metadata={"help": "CPUs each encode task asks Ray for, and its "
                                                                 "torch threads"})
    use_gpu: bool = field(default=False, metadata={"help": "encode on a GPU (one per encode task)"})
    max_sources: int = field(default=0, metadata={"help": "encode at most this many new source shards in this "
                                                           "run (0: all)"})
    codes: str = field(default="model", metadata={
        "help": "where a face's codes come from: model (the network's assignment to its codewords, the paper's "
                "OPQN codes) or gallery (a product quantizer of the normalised feature, M bytes, trained without "
                "labels on the gallery's first faces: keeps far more of the float ranking on people and photos "
                "the model never saw, docs/results.md); fixed for a gallery by its first encode",
        "choices": CODE_SOURCES})
    store_features: bool = field(default=False, metadata={
        "help": "also store each face's l2-normalised float feature (float16, 2 x D bytes a face) in "
                "GALLERY/features/ for `opqn query --rerank`; fixed for a gallery by its first encode"})
    refine_bytes: int = field(default=0, metadata={
        "help": "also store a refine code of B bytes a face (a product quantizer of the normalised float "
                "feature) in GALLERY/refine/ for `opqn query --refine`; 0: none; fixed for a gallery by its "
                "first encode, which trains the quantizer on its first faces"})
    refine_dim: int = field(default=0, metadata={"help": "dimension the feature is projected to before the "
                                                          "refine PQ (0: min(4 B, D))"})
    refine_sample: int = field(default=TRAIN_SAMPLE, metadata={"help": "faces the refine quantizer is trained on "
                                                                  "(the first ones encoded)"})
    commit_seconds: float = field(default=10.0, metadata={
        "help": "finished source shards are committed together at most this often (seconds); 0 commits each "
                "as soon as it is complete; longer: fewer manifest rewrites, more redone after a crash"})
    executor: str = field(default="ray", metadata={"help": "ray (in-process, or the cluster of RAY_ADDRESS) or "
                                                            "local (no Ray)", "choices": EXECUTORS})

    lease_seconds: float = field(default=120.0, metadata={
        "help": "the run holds the gallery's writer lease (one writer per gallery), renewed every third of this; "
                "a killed run's lease is taken over after this many seconds (at once on the same host)"})

    def __post_init__(self):
        if self.codes not in CODE_SOURCES:
            raise ValueError(f"codes must be one of {CODE_SOURCES}, got {self.codes!r}")
        if self.executor not in EXECUTORS:
            raise ValueError(f"executor must be one of {EXECUTORS}, got {self.executor!r}")


def codebook_scheme(state: dict, codes: str = "model") -> str:
    if codes == "gallery":
        return "gallery-pq"
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
        gallery.check_codes(cfg.codes)
    done = gallery.encoded_sources if gallery else {}
    replaced = replaced_keys(dataset)  # face shards an erasure rewrote: encoded if their original was
    todo, stale = [], []
    for url, key, fingerprint in face_shards(dataset):
        if key not in done:
            if encoded_key(key, done, replaced) is None:
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


def encode_gallery(model_url: str, dataset: str, gallery_url: str, cfg: EncodeConfig = EncodeConfig(),
                   out=None) -> dict:
    """Encode the dataset's not-yet-encoded face shards into the gallery; returns counts.

    Holds the gallery's writer lease (storage.lease) throughout: a second encode into the same
    gallery fails at once naming this one. Local paths are made absolute before any task sees
    them (a task on another node or process has another working directory)."""
    model_url, dataset, gallery_url = (urls.absolute(u) for u in (model_url, dataset, gallery_url))
    with lease.held(gallery_url, f"opqn encode {model_url} {dataset} {gallery_url}", cfg.lease_seconds) as held:
        # the stream is resolved per call: one captured at import may be closed later
        return _encode(model_url, dataset, gallery_url, cfg, out or sys.stderr, held)


def _encode(model_url: str, dataset: str, gallery_url: str, cfg: EncodeConfig, out, held: lease.Lease) -> dict:
    """``encode_gallery`` while holding the gallery's writer lease."""
    t0 = time.monotonic()
    record_gallery(dataset, gallery_url)  # before reading the dataset: an erasure must find this gallery
    state, gallery, todo, expected = plan(model_url, dataset, gallery_url, cfg)
    skipped = len(gallery.encoded_sources) if gallery else 0
    summary = {"gallery": gallery_url, "model_id": state["model_id"], "sources_encoded": 0,
               "sources_skipped": skipped, "faces": 0, "rejected": 0, "code_shards_written": 0, "commits": 0,
               "store_features": cfg.store_features, "refine_bytes": cfg.refine_bytes, "codes": cfg.codes}
    if not todo:
        say("encode", f"encode: nothing new in {dataset} for {gallery_url} ({skipped} source shard(s) already "
            f"encoded)", out)
        return summary
    codebook, refine = prepare_quantizers(state, gallery, gallery_url, [url for url, _, _ in todo], cfg, out)
    if cfg.executor == "ray":
        start_ray()
    c = state["config"]
    metadata = gallery_metadata(state["model_id"], c["D"], c["M"], c["K"], codebook_scheme(state, cfg.codes), {},
                                store_features=cfg.store_features, refine=refine.meta if refine else None,
                                codebook=codebook.meta if codebook else None)
    job = EncodeJob(gallery_url=gallery_url, splits=tuple(cfg.splits), batch_size=cfg.batch_size,
                    shard_rows=cfg.shard_rows, threads=cfg.threads_per_actor if cfg.executor == "ray" else 0,
                    use_gpu=cfg.use_gpu, store_features=cfg.store_features, model_id=state["model_id"],
                    erased=erased_hashes(gallery_url) if gallery else frozenset(),
                    refine_quantizer=refine.quantizer if refine else None,
                    code_quantizer=codebook.quantizer if codebook else None)
    total = sum(expected.values())
    say("encode", f"encode: {total} faces in {len(todo)} new source shard(s) of {dataset} -> {gallery_url} "
        f"(model {state['model_id']}, {skipped} source shard(s) already encoded"
        f"{', gallery codes' if codebook else ''}{', with float16 features' if cfg.store_features else ''}"
        f"{f', with {cfg.refine_bytes}-byte refine codes' if cfg.refine_bytes else ''})", out)
    progress = Progress(total, "faces", "encode", stream=out)

    def commit(pending: list) -> None:
        committed = commit_sources(gallery_url, metadata, [(k, f, e) for k, f, e, _, _ in pending],
                                   tuple(s.entry for s in (codebook, refine) if s and s.entry))
        for key, _, _, faces, rejected in pending:
            if key not in committed:  # another writer listed this source first: not ours to count
                continue
            summary["sources_encoded"] += 1
            summary["faces"] += faces
            summary["rejected"] += rejected
            summary["code_shards_written"] += -(-faces // cfg.shard_rows)  # write_source cuts every shard_rows
        summary["commits"] += 1

    commits = CommitGroups(cfg.commit_seconds, commit, held)  # written, not yet committed source shards
    tasks = run_tasks(encode_source, todo, shared=(model_state(state), job), executor=cfg.executor,
                      max_in_flight=cfg.actors or None, num_cpus=cfg.threads_per_actor,
                      num_gpus=1 if cfg.use_gpu else 0)
    for (_, key, fingerprint), (entries, faces, rejected) in tasks:
        commits.add((key, fingerprint, entries, faces, rejected))
        if faces + rejected:
            progress.update(faces + rejected)
    commits.flush(force=True)
    summary["seconds"] = time.monotonic() - t0
    say("encode", f"encode done in {format_seconds(summary['seconds'])}: {summary['faces']} faces encoded, "
        f"{summary['rejected']} rejected, {summary['code_shards_written']} code shard(s) written, "
        f"{summary['sources_encoded']} source shard(s) new in {summary['commits']} commit(s), "
        f"{skipped} skipped as already encoded", out)
    return summary
