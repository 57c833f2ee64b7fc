"""One encode task: a source face shard in, its code (feature, refine) shards written, not yet listed.

``encode_source`` runs once per source shard (``pipelines.execution.run_tasks``, on Ray or in
this process). The model is built once per worker process (``execution.process_cached``, keyed by
the model id) from the checkpoint state the driver planned with, which every task reads from the
object store: all tasks encode with exactly that model, never with a re-read of its URL (and
check its model id against the planned one, ``check_model``). Features with a NaN or infinity
fail the task naming the model and the shard (``check_finite``), so no garbage code is ever
written, let alone committed. Faces are decoded and encoded ``batch_size`` at a time into hard
codes, with ``store_features`` also
into the l2-normalised float feature as float16 (``model.features.stored_feature``: the
vector evaluation's float upper bound takes the cosine of), and with a refine quantizer also
into the refine code of that normalised feature (``model.refine``; the quantizer file is read
from the gallery once per process and checked against its sha256). A face whose image cannot be
decoded becomes a reject with its reason instead of failing the whole run. The task writes the
source's shards (``pipelines.formats.gallery_writer.write_source``) and returns their manifest
entries; the driver lists them in a commit.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from model.features import embed, normalized_feature
from pipelines.execution import process_cached
from pipelines.formats.checkpoint import model_from_checkpoint, stored_size
from pipelines.formats.faces import decode_face, read_face_columns
from pipelines.formats.gallery import code_numpy_dtype, face_id_hash, read_quantizer
from pipelines.formats.gallery_writer import write_source
from storage.manifest import FileEntry

TRAINING_ONLY = ("optimizer", "scheduler", "history")  # checkpoint parts an encode task never reads


def model_state(state: dict) -> dict:
    """The checkpoint without its training-only parts: what every task gets through the object store."""
    return {k: v for k, v in state.items() if k not in TRAINING_ONLY}


@dataclass(frozen=True)
class EncodeJob:
    """What every encode task of a run shares besides the model."""

    gallery_url: str
    splits: tuple  # face splits to encode; empty: every face
    batch_size: int
    shard_rows: int
    threads: int  # torch threads of a task; 0 leaves the process's setting (in-process runs)
    use_gpu: bool
    store_features: bool
    refine_quantizer: dict | None = None  # manifest entry of the gallery's refine quantizer file
    code_quantizer: dict | None = None  # manifest entry of the quantizer of the gallery's own codes; None: the model's
    model_id: str = ""  # the model the driver planned with (and will commit as the gallery's model)
    erased: frozenset = frozenset()  # face_id_hash of the faces deleted from the gallery: never encoded


class NonFiniteFeaturesError(ValueError):
    """The model gave NaN or infinite features: its codes would be garbage (a NaN feature becomes code 0)."""


def check_model(state: dict, job: EncodeJob) -> None:
    """Refuse to encode with another model than the planned one: the gallery records ``job.model_id``."""
    if job.model_id and state.get("model_id") != job.model_id:
        raise ValueError(f"encode task got model {state.get('model_id')}, but the run was planned with "
                         f"{job.model_id}; nothing of this run after its last commit is committed")


def check_finite(x: torch.Tensor, model_id: str, url: str) -> None:
    """``NonFiniteFeaturesError`` naming the model and the source shard when ``x`` has NaN or inf."""
    finite = torch.isfinite(x).all(dim=1)
    if not bool(finite.all()):
        raise NonFiniteFeaturesError(f"model {model_id} gave non-finite (NaN or infinite) features for "
                                     f"{int((~finite).sum())} face(s) of source shard {url}; encode stops and "
                                     "commits none of them (a diverged checkpoint?)")


def _model(state: dict, device: torch.device):
    return process_cached(("encode-model", state["model_id"], str(device)),
                          lambda: model_from_checkpoint(state).to(device))


def _quantizer(job: EncodeJob, entry: dict | None):
    if entry is None:
        return None
    return process_cached(("gallery-quantizer", job.gallery_url, entry["sha256"]),
                          lambda: read_quantizer(job.gallery_url, entry))


def encode_source(source: tuple, state: dict, job: EncodeJob) -> tuple[list[FileEntry], int, int]:
    """Encode one source face shard (``source``: its (url, key, fingerprint) from ``face_shards``)
    and write its shards; returns (manifest entries, faces encoded, faces rejected)."""
    url, key = source[0], source[1]
    check_model(state, job)
    if job.threads:
        torch.set_num_threads(job.threads)
    device = torch.device("cuda" if job.use_gpu and torch.cuda.is_available() else "cpu")
    model, size = _model(state, device), stored_size(state)
    quantizer, code_quantizer = _quantizer(job, job.refine_quantizer), _quantizer(job, job.code_quantizer)
    cfg = model.cfg
    table = read_face_columns([url], ("face_id", "identity", "split", "image"))
    if job.splits:
        table = table.filter(np.isin(np.asarray(table.column("split").to_pylist(), dtype=object), list(job.splits)))
    if job.erased:  # deleted from this gallery (maybe before it was ever encoded): skipped for good
        table = table.filter(np.asarray([face_id_hash(f) not in job.erased
                                         for f in table.column("face_id").to_pylist()], dtype=bool))
    face_ids = np.asarray(table.column("face_id").to_pylist(), dtype=object)
    identities = np.asarray(table.column("identity").to_pylist(), dtype=object)
    images = table.column("image")
    n = len(face_ids)
    reasons = np.full(n, "", dtype=object)
    codes = np.zeros((n, cfg.M), dtype=code_numpy_dtype(cfg.K))
    features = np.zeros((n, cfg.D), dtype=np.float16) if job.store_features else None
    refine = np.zeros((n, quantizer.bytes), dtype=np.uint8) if quantizer is not None else None
    for start in range(0, n, job.batch_size):
        decoded, rows = [], []
        for i, data in enumerate(images.slice(start, job.batch_size).to_pylist(), start):
            try:
                decoded.append(decode_face(bytes(data), size))
                rows.append(i)
            except Exception as exc:  # undecodable crop: a reject, not a crash
                reasons[i] = f"image cannot be decoded: {exc}"
        if not rows:
            continue
        x = embed(model, torch.from_numpy(np.stack(decoded)).to(device))
        check_finite(x, state["model_id"], url)
        needs_normalized = code_quantizer is not None or features is not None or refine is not None
        normalized = normalized_feature(x) if needs_normalized else None
        codes[rows] = (code_quantizer.encode(normalized) if code_quantizer is not None
                       else model.codes_from_features(x).cpu().numpy())
        if normalized is not None:
            if features is not None:
                features[rows] = normalized.astype(np.float16)  # model.features.stored_feature
            if refine is not None:
                refine[rows] = quantizer.encode(normalized)
    ok = reasons == ""
    entries = write_source(job.gallery_url, key, face_ids[ok], identities[ok], codes[ok], cfg.M, cfg.K,
                           job.shard_rows, features[ok] if features is not None else None,
                           refine[ok] if refine is not None else None, (face_ids[~ok], reasons[~ok]))
    return entries, int(ok.sum()), int((~ok).sum())
