"""Gallery maintenance: tombstone deletions, compaction, and a summary for operators.

Deleting writes a tombstone file and lists it in one commit, so queries skip those faces at
once; compaction later rewrites only the code shards that hold deleted faces (and, in a
gallery with features, their paired feature shards, row for row) and swaps them in with the
tombstones removed, again in one commit. Both leave the old files in place for readers of the
previous manifest.
"""
from __future__ import annotations

from dataclasses import replace

import pyarrow as pa
import pyarrow.compute as pc

from pipelines.gallery import (CODES_DIR, TOMBSTONE_SCHEMA, TOMBSTONES_DIR, code_schema, deleted_ids,
                               feature_schema, require_gallery, write_feature_shard)
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
        if gallery.has_features:
            fentry = gallery.features[i]
            features = read_table(urls.join(gallery_url, fentry.path))
            if not features.column("face_id").equals(table.column("face_id")):
                raise ValueError(f"gallery {gallery_url}: feature shard {fentry.path} does not hold the faces of "
                                 f"{entry.path} row for row; not compacting")
            removed.append(fentry.path)
        if kept.num_rows:
            code_entry = write_data_file(gallery_url, kept.cast(schema), subdir=CODES_DIR, schema=schema)
            added.append(code_entry)
            if gallery.has_features:  # same mask, same order: the pair stays aligned
                fschema = feature_schema(gallery.D)
                added.append(write_feature_shard(gallery_url, code_entry,
                                                 features.filter(pc.invert(mask)).cast(fschema)))
    tombstones = {t.path for t in gallery.tombstones}

    def change(current: Manifest) -> Manifest:
        listed = {f.path for f in current.files}
        if not set(removed) <= listed or not tombstones <= listed:
            raise RuntimeError(f"gallery {gallery_url} changed during compaction; run compact again")
        gone = set(removed) | tombstones
        return replace(current, files=tuple(f for f in current.files if f.path not in gone) + tuple(added))

    commit(gallery_url, change)
    return {"rewritten": len(removed), "removed_faces": dropped, "tombstones_dropped": len(tombstones)}


def info(gallery_url: str) -> dict:
    gallery = require_gallery(gallery_url)
    size = sum(s.size for s in gallery.shards)
    out = {"gallery": gallery_url, "model_id": gallery.model_id, "D": gallery.D, "M": gallery.M, "K": gallery.K,
           "codebook_scheme": gallery.codebook_scheme, "faces": gallery.rows, "code_shards": len(gallery.shards),
           "bytes": size, "deleted": len(deleted_ids(gallery)), "source_shards_encoded": len(gallery.encoded_sources),
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
    return out
