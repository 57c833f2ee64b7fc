"""A gallery's quantizers at encode time: its own codes (``opqn encode --codes gallery``) and its
refine codes (``--refine-bytes B``).

Both are ``model.refine`` product quantizers of the normalised float feature, trained once per
gallery so that codes written by different encode runs are comparable and queries decode them
all the same way. The first encode that needs one trains it, in the driver, on the gallery's
own faces: the first ``refine_sample`` faces (of the selected splits) of the source shards it is
about to encode, in their listed order, so the same dataset gives the same quantizer. Their
features are computed here with the model, as the encode tasks will compute them, once for
both quantizers; training is seeded (``model.refine.TRAIN_SEED``). A quantizer file is written
before any code shard and listed, with the manifest's ``codebook`` or ``refine`` entry, in the
run's first commit; every later encode (and every query) reads it back from the gallery.

Why gallery codes: the model's own codes are its assignment of each sub-vector to a codeword,
learned on the training identities; on people and photo conditions it never saw most of the
float feature's ranking is lost in them (docs/results.md: 0.44x the float mAP on unseen LFW
people). A quantizer trained on the gallery's own faces, without labels, as faiss trains an
index, keeps 0.63-0.69x at the same M bytes, and 0.94-0.99x of float P@5 on AT&T's grey photos.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from model.features import embed, normalized_feature
from model.refine import check_bytes, train_gallery_codes, train_quantizer
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


def prepare_quantizers(state: dict, gallery: Gallery | None, gallery_url: str, source_urls: list[str], cfg,
                       out) -> tuple[RefineSetup | None, RefineSetup | None]:
    """(gallery codes setup, refine setup) of this encode run (``cfg``: an ``EncodeConfig``): the
    gallery's quantizers, or new ones trained on the faces about to be encoded; None where the
    run uses the model's codes (``cfg.codes == "model"``) or writes no refine codes."""
    c = state["config"]
    sample: list[np.ndarray] = []

    def features() -> np.ndarray:
        if not sample:
            if cfg.refine_sample < 1:
                raise ValueError(f"refine_sample must be >= 1, got {cfg.refine_sample}")
            x = sample_features(state, source_urls, tuple(cfg.splits), cfg.refine_sample, cfg.batch_size, cfg.use_gpu)
            if not len(x):
                raise ValueError(f"cannot train the quantizers of {gallery_url}: the source shards to encode hold "
                                 f"no decodable face of splits {list(cfg.splits) or 'any'}")
            sample.append(x)
        return sample[0]

    def setup(kind: str, meta: dict | None, train) -> RefineSetup:
        if meta is not None:
            return RefineSetup(meta, None)
        x = features()
        quantizer = train(x)
        entry, new = write_quantizer(gallery_url, quantizer, len(x), kind=kind)
        say("encode", f"encode: trained the gallery's {kind} quantizer (PQ {quantizer.bytes} x 8 bit over a "
            f"{quantizer.dim}-dim projection of D={quantizer.D}) on {len(x)} faces -> {entry.path}", out)
        return RefineSetup(new, entry)

    codebook = refine = None
    if cfg.codes == "gallery":
        codebook = setup("codes", gallery.codebook_meta if gallery else None,
                         lambda x: train_gallery_codes(x, c["M"], c["K"]))
    if cfg.refine_bytes:
        check_bytes(cfg.refine_bytes, c["D"])
        refine = setup("refine", gallery.refine_meta if gallery and gallery.has_refine else None,
                       lambda x: train_quantizer(x, cfg.refine_bytes, cfg.refine_dim))
    return codebook, refine
