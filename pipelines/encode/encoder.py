"""The per-batch work of encoding: a callable class Ray Data runs in an actor pool.

Each actor loads the model once (GPU when asked and present) and turns batches of encoded
face crops into hard codes, and with ``store_features`` also into the l2-normalised float
feature as float16 (``pipelines.inference.stored_feature``: the vector evaluation's float
upper bound takes the cosine of), and with ``refine`` also into the refine code of that
normalised feature (``model.refine``; the quantizer is read from the gallery once per
actor and checked against its sha256). A face whose image cannot be decoded becomes a reject
with its reason instead of failing the whole run.
"""
from __future__ import annotations

import numpy as np
import torch

from pipelines.checkpoint import load_checkpoint, model_from_checkpoint
from pipelines.image_folder import decode_face
from pipelines.gallery import read_quantizer
from pipelines.inference import normalized_feature, stored_size
from pipelines.retrieval import embed


class Encoder:
    def __init__(self, model_url: str, splits: tuple = (), threads: int = 1, use_gpu: bool = False,
                 store_features: bool = False, refine: dict | None = None):
        torch.set_num_threads(max(1, threads))
        state = load_checkpoint(model_url)
        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        self.model = model_from_checkpoint(state).to(self.device)
        self.size = stored_size(state)
        self.M = self.model.cfg.M
        self.splits = set(splits)
        self.store_features = store_features
        # refine: {"gallery": URL, "quantizer": the manifest entry of the quantizer file}
        self.refine = read_quantizer(refine["gallery"], refine["quantizer"]) if refine else None

    def __call__(self, batch: dict) -> dict:
        keep = np.ones(len(batch["face_id"]), dtype=bool)
        if self.splits:
            keep &= np.isin(batch["split"], list(self.splits))
        images, reasons = [], []
        for i in np.flatnonzero(keep):
            try:
                images.append(decode_face(bytes(batch["image"][i]), self.size))
                reasons.append("")
            except Exception as exc:  # undecodable crop: a reject, not a crash
                reasons.append(f"image cannot be decoded: {exc}")
        idx = np.flatnonzero(keep)
        ok = np.array([r == "" for r in reasons], dtype=bool)
        codes = np.zeros((len(idx), self.M), dtype=np.uint16 if self.model.cfg.K > 256 else np.uint8)
        features = np.zeros((len(idx), self.model.cfg.D), dtype=np.float16) if self.store_features else None
        refine = np.zeros((len(idx), self.refine.bytes), dtype=np.uint8) if self.refine else None
        if ok.any():
            x = embed(self.model, torch.from_numpy(np.stack(images)).to(self.device))
            codes[ok] = self.model.codes_from_features(x).cpu().numpy()
            normalized = normalized_feature(x) if features is not None or refine is not None else None
            if features is not None:
                features[ok] = normalized.astype(np.float16)  # pipelines.inference.stored_feature
            if refine is not None:
                refine[ok] = self.refine.encode(normalized)
        out = {"face_id": batch["face_id"][idx], "identity": batch["identity"][idx], "path": batch["path"][idx],
               "codes": codes, "reject": np.array(reasons, dtype=object)}
        if features is not None:
            out["features"] = features
        if refine is not None:
            out["refine"] = refine
        return out
