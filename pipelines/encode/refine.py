"""The gallery's refine quantizer at encode time (``opqn encode --refine-bytes B``).

A gallery's refine codes all come from one quantizer (``model.refine``), so codes written
by different encode runs are comparable and queries decode them all the same way. The first
encode that writes refine codes into a gallery trains it, in the driver, on the gallery's own
faces: the first ``refine_sample`` faces (of the selected splits) of the source shards it is
about to encode, in their listed order, so the same dataset gives the same quantizer. Their
features are computed here with the model, as the encode tasks will compute them; training
is seeded (``model.refine.TRAIN_SEED``). The quantizer file is written before any code
shard and listed, with the manifest's ``refine`` entry, in the run's first commit; every later
encode (and every query) reads it back from the gallery.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from model.features import embed, normalized_feature
from model.refine import check_bytes, train_quantizer
from pipelines.formats.checkpoint import model_from_checkpoint, stored_size
from pipelines.formats.faces import decode_face, read_face_columns
from pipelines.formats.gallery import Gallery
from pipelines.formats.gallery_writer import write_quantizer
from pipelines.progress import say
from storage.manifest import FileEntry


@dataclass(frozen=True)
class RefineSetup:
    meta: dict  # the manifest's "refine" entry
    entry: FileEntry | None  # the quantizer file to list in this run's commits; None: the gallery lists it

    @property
    def quantizer(self) -> dict:
        return self.meta["quantizer"]


def sample_features(state: dict, source_urls: list[str], splits: tuple, limit: int, batch_size: int = 256,
                    use_gpu: bool = False) -> np.ndarray:
    """Normalised float features (n <= limit, D) of the first ``limit`` faces of the selected
    splits in ``source_urls`` (in order); undecodable crops are skipped, as encode rejects them."""
    device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
    model = model_from_checkpoint(state).to(device)
    size = stored_size(state)
    out, taken = [], 0
    for url in source_urls:
        table = read_face_columns([url], ("split", "image"))
        for start in range(0, table.num_rows, batch_size):
            batch = table.slice(start, batch_size)
            split, images = batch.column("split").to_pylist(), batch.column("image").to_pylist()
            decoded = []
            for s, image in zip(split, images):
                if splits and s not in splits:
                    continue
                try:
                    decoded.append(decode_face(bytes(image), size))
                except Exception:  # an undecodable crop: encode records it as a reject
                    continue
            decoded = decoded[:limit - taken]
            if decoded:
                x = embed(model, torch.from_numpy(np.stack(decoded)).to(device))
                out.append(normalized_feature(x))
                taken += len(decoded)
            if taken >= limit:
                return np.concatenate(out)
    return np.concatenate(out) if out else np.zeros((0, model.cfg.D), np.float32)


def prepare_refine(state: dict, gallery: Gallery | None, gallery_url: str, source_urls: list[str], cfg,
                   out) -> RefineSetup | None:
    """The refine setup of this encode run: the gallery's quantizer, or a new one trained on the
    faces about to be encoded (``cfg``: an ``EncodeConfig``). None without ``cfg.refine_bytes``."""
    if not cfg.refine_bytes:
        return None
    if gallery is not None and gallery.has_refine:
        return RefineSetup(gallery.refine_meta, None)
    check_bytes(cfg.refine_bytes, state["config"]["D"])
    if cfg.refine_sample < 1:
        raise ValueError(f"refine_sample must be >= 1, got {cfg.refine_sample}")
    features = sample_features(state, source_urls, tuple(cfg.splits), cfg.refine_sample, cfg.batch_size,
                               cfg.use_gpu)
    if not len(features):
        raise ValueError(f"cannot train the refine quantizer of {gallery_url}: the source shards to encode hold no "
                         f"decodable face of splits {list(cfg.splits) or 'any'}")
    quantizer = train_quantizer(features, cfg.refine_bytes, cfg.refine_dim)
    entry, meta = write_quantizer(gallery_url, quantizer, len(features))
    say("encode", f"encode: trained a {quantizer.bytes}-byte refine quantizer (PQ {quantizer.bytes} x 8 bit over "
        f"a {quantizer.dim}-dim projection of D={quantizer.D}) on {len(features)} faces -> {entry.path}", out)
    return RefineSetup(meta, entry)
