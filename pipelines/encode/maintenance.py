"""Gallery maintenance: tombstone deletions, compaction, and a summary for operators.

Deleting writes a tombstone file and lists it in one commit, so queries skip those faces at
once; compaction later rewrites only the code shards that hold deleted faces and swaps them
in with the tombstones removed, again in one commit. Both leave the old files in place for
readers of the previous manifest.
"""
from __future__ import annotations

from dataclasses import replace

import pyarrow as pa
import pyarrow.compute as pc

from pipelines.gallery import (CODES_DIR, TOMBSTONE_SCHEMA, TOMBSTONES_DIR, code_schema, deleted_ids,
                               require_gallery)
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
    for entry in gallery.shards:
        table = read_table(urls.join(gallery_url, entry.path))
        mask = pc.is_in(table.column("face_id"), dead_arr)
        hits = pc.sum(mask).as_py() or 0
        if not hits:
            continue
        kept = table.filter(pc.invert(mask))
        dropped += hits
        removed.append(entry.path)
        if kept.num_rows:
            added.append(write_data_file(gallery_url, kept.cast(schema), subdir=CODES_DIR, schema=schema))
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
    return {"gallery": gallery_url, "model_id": gallery.model_id, "D": gallery.D, "M": gallery.M, "K": gallery.K,
            "codebook_scheme": gallery.codebook_scheme, "faces": gallery.rows, "code_shards": len(gallery.shards),
            "bytes": size, "deleted": len(deleted_ids(gallery)), "source_shards_encoded": len(gallery.encoded_sources),
            "generation": gallery.generation}
