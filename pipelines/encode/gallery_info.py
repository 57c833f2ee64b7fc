"""`opqn gallery info`: a summary of a gallery for operators.

Size, model, deleted count, stored features and refine codes with their bytes, and the spread
of the live codes (``model.code_spread``), reading every code shard once: a sink code (one code
holding much of the gallery) is named with its share.
"""
from __future__ import annotations

import pyarrow as pa

from model.code_spread import SpreadCounter, sink_warning
from pipelines.formats.gallery import Gallery, deleted_ids, live_rows, read_codes, require_gallery


def gallery_spread(gallery: Gallery, dead: set[str], storage_options: dict | None = None) -> dict:
    """``model.code_spread`` of the gallery's live codes (tombstoned faces left out), shard by shard."""
    counter = SpreadCounter(gallery.M, gallery.K)
    deleted = pa.array(sorted(dead), pa.string())
    for url in gallery.shard_urls():
        face_ids, codes = read_codes(url, gallery.M, storage_options)
        rows = live_rows(face_ids, deleted)
        counter.add(codes if rows is None else codes[rows])
    return counter.result()


def info(gallery_url: str) -> dict:
    """Size, model, deleted count, features and refine codes with their bytes, and the spread of
    the live codes (largest code bucket, distinct codes, codewords used, entropy), with the
    sink-code warning when one code holds too much of the gallery."""
    gallery = require_gallery(gallery_url)
    size = sum(s.size for s in gallery.shards)
    dead = deleted_ids(gallery)
    out = {"gallery": gallery_url, "model_id": gallery.model_id, "D": gallery.D, "M": gallery.M, "K": gallery.K,
           "codebook_scheme": gallery.codebook_scheme, "faces": gallery.rows, "code_shards": len(gallery.shards),
           "bytes": size, "deleted": len(dead), "source_shards_encoded": len(gallery.encoded_sources),
           "generation": gallery.generation}
    if gallery.codebook_meta is not None:
        meta = gallery.codebook_meta
        out["codes"] = (f"gallery: PQ {meta['bytes']} x {meta['nbits']} bit over a {meta['dim']}-dim projection, "
                        f"trained on {meta['trained_on']} of its faces ({meta['quantizer']['path']})")
    else:
        out["codes"] = "model: the network's own codes"
    # "bytes" stays the code shards' size; features (for --rerank) are counted on their own
    if gallery.has_features:
        fbytes = sum(f.size for f in gallery.features)
        out["features"] = f"{gallery.feature_meta['dtype']} x {gallery.D}, l2-normalised (re-rank enabled)"
        out["feature_bytes"] = fbytes
        out["feature_bytes_per_face"] = round(fbytes / gallery.rows, 1) if gallery.rows else 0.0
    else:
        out["features"] = "none (codes only; --rerank needs a gallery encoded with --store-features)"
        out["feature_bytes"] = 0
    if gallery.has_refine:
        meta = gallery.refine_meta
        out["refine"] = (f"{meta['bytes']} bytes/face: PQ {meta['bytes']} x {meta['nbits']} bit over a {meta['dim']}-dim "
                         f"projection of the normalised feature, trained on {meta['trained_on']} faces "
                         f"({meta['quantizer']['path']}); codes + refine = {gallery.bytes_per_code + meta['bytes']} bytes/face")
        out["refine_shard_bytes"] = sum(f.size for f in gallery.refine)
    else:
        out["refine"] = "none (--refine needs a gallery encoded with --refine-bytes B)"
        out["refine_shard_bytes"] = 0
    spread = gallery_spread(gallery, dead)
    out.update({"live_faces": spread["rows"], "largest_bucket": round(spread["largest_bucket"], 6),
                "largest_bucket_rows": spread["largest_bucket_rows"], "largest_code": spread["largest_code"],
                "distinct_codes": spread["distinct_codes"], "codewords_used": spread["codewords_used"],
                "codewords_used_mean": round(spread["codewords_used_mean"], 2),
                "code_entropy_bits": round(spread["code_entropy_bits"], 4),
                "subspace_entropy_bits_mean": round(spread["subspace_entropy_bits_mean"], 4)})
    warning = sink_warning(spread, "live gallery faces")
    if warning:
        out["warning"] = warning
    return out
