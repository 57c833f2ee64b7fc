"""Erasure in the face dataset format (``pipelines.formats.faces``): which galleries were encoded
from a dataset, and face shards rewritten without forgotten faces.

Face crops are biometric data; a person's removal must reach every copy. So the dataset's
manifest metadata records:

- ``galleries``: every gallery an encode has written from this dataset (``record_gallery``,
  called before the encode lists anything), so an erasure misses none, older models' included;
- ``replaced``: ``{new face shard key: the key it replaced}`` for face shards an erasure rewrote,
  so a gallery that encoded the old shard does not encode its rewrite again (``encoded_key``);
- ``erasures``: one entry per erasure (UTC time, faces removed, shards rewritten), without ids.

``remove_faces`` rewrites the face shards holding the given face ids without them (same order,
fresh names) and swaps them in, each where its original was listed, in one commit. The photos'
``sources`` rows stay: they make a later ``prepare`` skip the same photos (by URL, and by content
at another URL). The old shards stay on storage, unlisted, until ``storage.vacuum``.
"""
from __future__ import annotations

import datetime as _dt
from dataclasses import replace

import pyarrow as pa
import pyarrow.compute as pc

from pipelines.formats.faces import FACE_SCHEMA, FACES_DIR
from storage import manifest as mf
from storage import tables


class GalleriesChanged(Exception):
    """Raised inside an erasure's commit: a gallery was recorded after the erasure read the list."""

    def __init__(self, galleries: list[str]):
        super().__init__(f"new galleries {galleries}")
        self.galleries = galleries


def recorded_galleries(dataset: str, storage_options: dict | None = None) -> list[str]:
    manifest = mf.read_manifest(dataset, storage_options)
    return list((manifest.metadata if manifest else {}).get("galleries", []))


def record_gallery(dataset: str, gallery_url: str, storage_options: dict | None = None) -> None:
    """Add ``gallery_url`` to the dataset's galleries (a metadata-only commit; a no-op when listed).

    A dataset without a manifest (assembled by hand) records nothing: it has no erasure either."""
    manifest = mf.read_manifest(dataset, storage_options)
    if manifest is None or gallery_url in manifest.metadata.get("galleries", []):
        return

    def change(current: mf.Manifest) -> mf.Manifest:
        galleries = list(current.metadata.get("galleries", []))
        if gallery_url in galleries:
            return current
        return replace(current, metadata={**current.metadata, "galleries": galleries + [gallery_url]})

    mf.commit(dataset, change, storage_options)


def encoded_key(key: str, done: dict, replaced: dict) -> str | None:
    """The key under which face shard ``key`` (or the shard it was rewritten from) is in ``done``."""
    seen = set()
    while key not in done and key in replaced and key not in seen:
        seen.add(key)
        key = replaced[key]
    return key if key in done else None


def replaced_keys(dataset: str, storage_options: dict | None = None) -> dict:
    manifest = mf.read_manifest(dataset, storage_options)
    return dict((manifest.metadata if manifest else {}).get("replaced", {}))


def find_faces(dataset: str, identities=(), face_ids=(), storage_options: dict | None = None) -> list[str]:
    """Face ids of the dataset's listed faces of ``identities`` or among ``face_ids``."""
    manifest = mf.read_manifest(dataset, storage_options)
    if manifest is None:
        raise ValueError(f"{dataset} has no manifest: only datasets written by `opqn prepare` can forget faces")
    found = []
    for entry in manifest.files:
        if entry.path.startswith(FACES_DIR + "/"):
            t = tables.read_table(mf.file_url(dataset, entry), ["face_id", "identity"], storage_options)
            hit = pc.or_(pc.is_in(t.column("face_id"), pa.array(list(face_ids), pa.string())),
                         pc.is_in(t.column("identity"), pa.array(list(identities), pa.string())))
            found += pc.filter(t.column("face_id"), pc.fill_null(hit, False)).to_pylist()
    return found


def remove_faces(dataset: str, face_ids: list[str], known_galleries: list[str],
                 storage_options: dict | None = None) -> dict:
    """Rewrite the face shards holding ``face_ids`` without them, in one commit; raises
    ``GalleriesChanged`` (committing nothing) if galleries beyond ``known_galleries`` were recorded."""
    manifest = mf.read_manifest(dataset, storage_options)
    dead = pa.array(sorted(set(face_ids)), pa.string())
    replacing: dict[str, list[mf.FileEntry]] = {}
    removed = 0
    for entry in manifest.files if manifest else ():
        if not entry.path.startswith(FACES_DIR + "/"):
            continue
        t = tables.read_table(mf.file_url(dataset, entry), None, storage_options)
        mask = pc.is_in(t.column("face_id"), dead)
        hits = pc.sum(mask).as_py() or 0
        if not hits:
            continue
        removed += hits
        kept = t.filter(pc.invert(mask)).cast(FACE_SCHEMA)
        replacing[entry.path] = [mf.write_data_file(dataset, kept, subdir=FACES_DIR, schema=FACE_SCHEMA,
                                                    storage_options=storage_options)] if kept.num_rows else []
    if not replacing:
        return {"faces_removed": 0, "shards_rewritten": 0}
    erasure = {"time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "faces": removed,
               "shards_rewritten": len(replacing)}

    def change(current: mf.Manifest) -> mf.Manifest:
        new_galleries = [g for g in current.metadata.get("galleries", []) if g not in known_galleries]
        if new_galleries:
            raise GalleriesChanged(new_galleries)
        if not set(replacing) <= set(current.paths):
            raise RuntimeError(f"dataset {dataset} changed during the erasure; run it again")
        listing, moved = [], dict(current.metadata.get("replaced", {}))
        for f in current.files:
            if f.path in replacing:
                listing += replacing[f.path]
                moved.update({new.path: f.path for new in replacing[f.path]})
            else:
                listing.append(f)
        meta = {**current.metadata, "replaced": moved,
                "erasures": list(current.metadata.get("erasures", [])) + [erasure]}
        return replace(current, files=tuple(listing), metadata=meta)

    mf.commit(dataset, change, storage_options)
    return {"faces_removed": removed, "shards_rewritten": len(replacing)}
