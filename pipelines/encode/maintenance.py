"""Gallery maintenance: tombstone deletions, compaction, and a summary for operators.

Deleting writes a tombstone file and lists it in one commit, so queries skip those faces at
once; compaction later rewrites only the code shards that hold deleted faces (and their
paired feature and refine shards, row for row) and swaps them in with the tombstones removed,
again in one commit. Both leave the old files in place for readers of the previous manifest.
``info`` also measures the spread of the live codes (``model.code_spread``), reading every code
shard once: a sink code (one code holding much of the gallery) is named with its share.
"""
from __future__ import annotations

from dataclasses import replace

import pyarrow as pa
import pyarrow.compute as pc

from model.code_spread import SpreadCounter, sink_warning
from pipelines.gallery import (CODES_DIR, FEATURES_DIR, REFINE_DIR, TOMBSTONE_SCHEMA, TOMBSTONES_DIR, Gallery,
                               code_schema, deleted_ids, feature_schema, live_rows, read_codes, refine_schema,
                               require_gallery, write_paired_shard)
from storage import urls
from storage.manifest import Delta, Manifest, commit, write_data_file
from storage.tables import read_table


def delete_faces(gallery_url: str, face_ids: list[str]) -> dict:
    """Tombstone ``face_ids``; ids not in the gallery are reported, not recorded."""
    gallery = require_gallery(gallery_url)
    wanted = set(face_ids) - deleted_ids(gallery)
    present: set[str] = set()
    for url in gallery.shard_urls():
        ids = read_table(url, columns=["face_id"]).column("face_id")
        present.update(pc.filter(ids, pc.is_in(ids, pa.array(sorted(wanted), pa.string()))).to_pylist())
    unknown = sorted(set(face_ids) - present - deleted_ids(gallery))
    if present:
        entry = write_data_file(gallery_url, pa.table({"face_id": sorted(present)}, schema=TOMBSTONE_SCHEMA),
                                subdir=TOMBSTONES_DIR, schema=TOMBSTONE_SCHEMA)
        commit(gallery_url, Delta(add=(entry,)))
    return {"deleted": len(present), "unknown": unknown, "already_deleted": len(set(face_ids) & deleted_ids(gallery))}


def _paired_kinds(gallery: Gallery, i: int) -> list[tuple[str, object, object]]:
    """(directory, manifest entry, schema) of the shards paired with code shard ``i``."""
    out = []
    if gallery.has_features:
        out.append((FEATURES_DIR, gallery.features[i], feature_schema(gallery.D)))
    if gallery.has_refine:
        out.append((REFINE_DIR, gallery.refine[i], refine_schema(gallery.refine_bytes)))
    return out


def compact(gallery_url: str) -> dict:
    """Rewrite the shards holding tombstoned faces without them and drop the tombstones."""
    gallery = require_gallery(gallery_url)
    dead = deleted_ids(gallery)
    if not gallery.tombstones:
        return {"rewritten": 0, "removed_faces": 0}
    schema = code_schema(gallery.M, gallery.K)
    dead_arr = pa.array(sorted(dead), pa.string())
    removed, added, dropped = [], [], 0
    for i, entry in enumerate(gallery.shards):
        table = read_table(urls.join(gallery_url, entry.path))
        mask = pc.is_in(table.column("face_id"), dead_arr)
        hits = pc.sum(mask).as_py() or 0
        if not hits:
            continue
        kept = table.filter(pc.invert(mask))
        dropped += hits
        removed.append(entry.path)
        paired = []  # (directory, its table without the deleted rows) of each paired shard
        for directory, pentry, pschema in _paired_kinds(gallery, i):
            ptable = read_table(urls.join(gallery_url, pentry.path))
            if not ptable.column("face_id").equals(table.column("face_id")):
                raise ValueError(f"gallery {gallery_url}: {directory} shard {pentry.path} does not hold the faces of "
                                 f"{entry.path} row for row; not compacting")
            removed.append(pentry.path)
            paired.append((directory, ptable.filter(pc.invert(mask)).cast(pschema)))  # same mask: still aligned
        if kept.num_rows:
            code_entry = write_data_file(gallery_url, kept.cast(schema), subdir=CODES_DIR, schema=schema)
            added.append(code_entry)
            added += [write_paired_shard(gallery_url, code_entry, ptable, directory) for directory, ptable in paired]
    tombstones = {t.path for t in gallery.tombstones}

    def change(current: Manifest) -> Manifest:
        listed = {f.path for f in current.files}
        if not set(removed) <= listed or not tombstones <= listed:
            raise RuntimeError(f"gallery {gallery_url} changed during compaction; run compact again")
        gone = set(removed) | tombstones
        return replace(current, files=tuple(f for f in current.files if f.path not in gone) + tuple(added))

    commit(gallery_url, change)
    return {"rewritten": len(removed), "removed_faces": dropped, "tombstones_dropped": len(tombstones)}


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
    # "bytes" stays the code shards' size; features (for --rerank) are counted on their own
    if gallery.has_features:
        fbytes = sum(f.size for f in gallery.features)
        out["features"] = f"{gallery.feature_meta['dtype']} x {gallery.D}, l2-normalised (re-rank enabled)"
        out["feature_bytes"] = fbytes
        out["feature_bytes_per_face"] = round(fbytes / gallery.rows, 1) if gallery.rows else 0.0
    else:
        out["features"] = "none (codes only; --rerank needs a gallery encoded with --store-features)"
        out["feature_bytes"] = 0
    code_bytes = gallery.M * (1 if gallery.K <= 256 else 2)
    if gallery.has_refine:
        meta = gallery.refine_meta
        out["refine"] = (f"{meta['bytes']} bytes/face: PQ {meta['bytes']} x {meta['nbits']} bit over a {meta['dim']}-dim "
                         f"projection of the normalised feature, trained on {meta['trained_on']} faces "
                         f"({meta['quantizer']['path']}); codes + refine = {code_bytes + meta['bytes']} bytes/face")
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
