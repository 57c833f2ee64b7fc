"""Writing a gallery (the layout is in ``pipelines.formats.gallery``): shards, the refine
quantizer file, the commit of encoded source shards, tombstones and compaction.

Nothing written here is visible until a manifest commit lists it. A source face shard is
committed whole (``commit_sources``): its code shards, paired feature/refine shards, rejects and
watermark entry appear in one atomic commit, so a crash leaves only whole source shards listed
and a re-run encodes exactly the rest. Deleting rewrites the gallery's one tombstone file (the
earlier ids and the new ones) in one commit, so queries skip those faces at once; compaction
later rewrites only the code shards that hold deleted faces (with their paired shards, row for
row) and the rejects files naming erased faces, merges the erasure records into one, and swaps
them in with the tombstones removed, again in one commit. Both leave the old files in place for
readers of the previous manifest (``storage.vacuum`` deletes them later).
Every function takes ``storage_options`` (s3fs options that override the environment).
"""
from __future__ import annotations

import hashlib
from dataclasses import replace

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from model.refine import NBITS, SCORING, TRANSFORM, RefineQuantizer
from pipelines.formats.gallery import (CODES_DIR, ERASED_DIR, ERASED_SCHEMA, FEATURE_ROW_GROUP, FEATURES_DIR,
                                       QUANTIZER_DIR, REFINE_DIR, REJECT_SCHEMA, REJECTS_DIR, TOMBSTONE_SCHEMA,
                                       TOMBSTONES_DIR, Gallery, code_schema, code_table, deleted_ids, erased_hashes,
                                       face_id_hash, feature_schema, feature_table, paired_path, refine_schema,
                                       refine_table, require_gallery)
from storage import files, lease, urls
from storage.manifest import Delta, FileEntry, Manifest, commit, read_manifest, write_data_file
from storage.tables import read_table, write_table


def write_paired_shard(gallery_url: str, code_entry: FileEntry, table: pa.Table, directory: str,
                       storage_options: dict | None = None) -> FileEntry:
    """Write the shard under ``directory`` (features/, refine/) paired with ``code_entry``, in row
    groups of FEATURE_ROW_GROUP rows (not listed until committed)."""
    if table.num_rows != code_entry.rows:
        raise ValueError(f"{directory} shard for {code_entry.path} has {table.num_rows} rows, the code shard "
                         f"{code_entry.rows}")
    path = paired_path(code_entry.path, directory)
    written = write_table(urls.join(gallery_url, path), table, table.schema, storage_options, exclusive=True,
                          row_group_size=FEATURE_ROW_GROUP)
    return FileEntry(path=path, rows=written.rows, size=written.size, sha256=written.sha256)


def write_code_shard(gallery_url: str, table: pa.Table, paired: dict | None = None,
                     storage_options: dict | None = None) -> list[FileEntry]:
    """Write a code shard and its paired shards (``paired``: directory -> table, same rows in the
    same order); returns their manifest entries, code shard first (none listed until committed)."""
    entry = write_data_file(gallery_url, table, subdir=CODES_DIR, schema=table.schema, storage_options=storage_options)
    return [entry] + [write_paired_shard(gallery_url, entry, ptable, directory, storage_options)
                      for directory, ptable in (paired or {}).items()]


def write_source(gallery_url: str, source: str, face_ids: np.ndarray, identities: np.ndarray, codes: np.ndarray,
                 M: int, K: int, shard_rows: int, features: np.ndarray | None = None,
                 refine: np.ndarray | None = None, rejects: tuple = ((), ()),
                 storage_options: dict | None = None) -> list[FileEntry]:
    """Write one source face shard's encoded faces: code shards of at most ``shard_rows`` rows,
    sorted by face id (a stable order whatever order the faces were encoded in), each with its
    feature and refine shard when ``features`` (n, D) / ``refine`` (n, B) are given, and
    ``rejects`` (face ids, reasons). Returns the manifest entries for ``commit_sources``."""
    order = np.argsort(face_ids, kind="stable")
    face_ids, identities, codes = face_ids[order], identities[order], codes[order]
    features = features[order] if features is not None else None
    refine = refine[order] if refine is not None else None
    entries = []
    for start in range(0, len(face_ids), shard_rows):
        sl = slice(start, start + shard_rows)
        ids = face_ids[sl].tolist()
        paired = {}
        if features is not None:
            paired[FEATURES_DIR] = feature_table(ids, features[sl], features.shape[1])
        if refine is not None:
            paired[REFINE_DIR] = refine_table(ids, refine[sl], refine.shape[1])
        entries += write_code_shard(gallery_url, code_table(ids, identities[sl].tolist(), codes[sl], M, K), paired,
                                    storage_options)
    reject_ids, reasons = rejects
    if len(reject_ids):
        table = pa.table({"face_id": list(reject_ids), "source": [source] * len(reject_ids),
                          "reason": list(reasons)}, schema=REJECT_SCHEMA)
        entries.append(write_data_file(gallery_url, table, subdir=REJECTS_DIR, schema=REJECT_SCHEMA,
                                       storage_options=storage_options))
    return entries


def write_quantizer(gallery_url: str, quantizer: RefineQuantizer, trained_on: int,
                    storage_options: dict | None = None, kind: str = "refine") -> tuple[FileEntry, dict]:
    """Write a quantizer (``kind``: "refine", or "codes" for the gallery's own codes) under
    quantizer/ (named by its content hash, so a re-run that trains the same quantizer writes the
    same file); returns its manifest entry (to list in the gallery's first commit that uses it)
    and the manifest's ``refine`` (or ``codebook``) entry."""
    data = quantizer.to_bytes()
    path = f"{QUANTIZER_DIR}/{kind}-{hashlib.sha256(data).hexdigest()[:16]}.npz"
    size, sha = files.write_bytes_atomic(urls.join(gallery_url, path), data, storage_options)
    entry = FileEntry(path=path, rows=0, size=size, sha256=sha)
    meta = {"bytes": quantizer.bytes, "nbits": NBITS, "dim": quantizer.dim, "transform": TRANSFORM,
            "scoring": SCORING, "trained_on": int(trained_on), "quantizer": entry.to_dict()}
    return entry, meta


def commit_sources(gallery_url: str, metadata: dict, written: list[tuple[str, str, list[FileEntry]]],
                   quantizers: tuple[FileEntry, ...] = (), storage_options: dict | None = None) -> set[str]:
    """List the written files of whole source shards, with their watermarks, in one atomic commit.

    ``metadata``: the gallery's metadata (``gallery_metadata``) as this encode run sees it, used
    for a new gallery and checked against an existing one (a concurrent run may have committed
    meanwhile). ``written``: (source key, fingerprint, manifest entries) per source shard.
    ``quantizers``: the quantizer files (refine, gallery codes) this run trained, listed if not yet listed.
    Idempotent per source: the watermark is re-checked on the manifest the commit lands on (each
    retry after a lost race included), and a source another writer committed meanwhile is
    dropped (its files stay unlisted), so no face is ever listed twice. Returns the keys this commit listed.
    """
    committed: set[str] = set()
    model_id, with_features = metadata["model_id"], metadata.get("features") is not None
    quantizer_files = {key: (metadata.get(key) or {}).get("quantizer") for key in ("refine", "codebook")}

    def change(current: Manifest) -> Manifest:
        meta = dict(current.metadata) if current.metadata else dict(metadata)
        if meta.get("model_id") != model_id:
            raise ValueError(f"gallery {gallery_url} was encoded by model {meta.get('model_id')} meanwhile")
        has_features = meta.get("features") is not None
        if has_features != with_features:
            raise ValueError(f"gallery {gallery_url} was encoded {'with' if has_features else 'without'} float "
                             f"features meanwhile; a gallery is either with or without features")
        for key, file in quantizer_files.items():
            if (meta.get(key) or {}).get("quantizer") != file:
                raise ValueError(f"gallery {gallery_url} got {'another' if meta.get(key) else 'no'} {key} "
                                 f"quantizer meanwhile (a concurrent encode); run encode again")
        sources = dict(meta.get("encoded_sources", {}))
        added = []
        committed.clear()
        for key, fingerprint, entries in written:
            if key in sources:  # a concurrent run committed this source first: add nothing twice
                continue
            sources[key] = fingerprint
            committed.add(key)
            added += entries
        if len(sources) == len(meta.get("encoded_sources", {})):
            return current
        # the first commit with refine (or gallery) codes lists their quantizer
        added = [q for q in quantizers if current.file(q.path) is None] + added
        meta["encoded_sources"] = sources
        return replace(current, files=current.files + tuple(added), metadata=meta)

    commit(gallery_url, change, storage_options)
    return committed


def write_tombstones(gallery_url: str, face_ids, storage_options: dict | None = None) -> FileEntry:
    """Write a tombstone file of ``face_ids`` (not listed until committed)."""
    return write_data_file(gallery_url, pa.table({"face_id": pa.array(face_ids, pa.string())}, schema=TOMBSTONE_SCHEMA),
                           subdir=TOMBSTONES_DIR, schema=TOMBSTONE_SCHEMA, storage_options=storage_options)


def list_files(gallery_url: str, entries, metadata: dict | None = None, storage_options: dict | None = None) -> None:
    """List written files (shards, tombstones) in one commit, setting the keys of ``metadata``
    (a new gallery's ``gallery_metadata``, for a gallery written whole)."""
    commit(gallery_url, Delta(add=tuple(entries), metadata=metadata or {}), storage_options)


def delete_faces(gallery_url: str, face_ids: list[str], storage_options: dict | None = None) -> dict:
    """Tombstone ``face_ids`` present in the gallery (queries skip them at once) and record every one
    of them, present or not, as erased (``ERASED_DIR``: later encodes skip them for good), in one
    commit; ids not in the gallery yet are reported as ``unknown``. The gallery keeps one tombstone
    file: each delete rewrites it with the earlier ids (a query reads one file, not one per delete).
    Holds the gallery's writer lease (storage.lease): one writer per gallery."""
    with lease.held(gallery_url, f"opqn gallery delete {gallery_url}", storage_options=storage_options):
        return _delete_faces(gallery_url, face_ids, storage_options)


def _delete_faces(gallery_url: str, face_ids: list[str], storage_options: dict | None) -> dict:
    gallery = require_gallery(gallery_url, storage_options)
    already = deleted_ids(gallery, storage_options)
    wanted = pa.array(sorted(set(face_ids) - already), pa.string())
    present: set[str] = set()
    for url in gallery.shard_urls():
        ids = read_table(url, columns=["face_id"], storage_options=storage_options).column("face_id")
        present.update(pc.filter(ids, pc.is_in(ids, wanted)).to_pylist())
    new_erased = sorted({face_id_hash(f) for f in face_ids} - erased_hashes(gallery_url, storage_options))
    written = [write_tombstones(gallery_url, sorted(present | already), storage_options)] if present else []
    if new_erased:
        written.append(write_data_file(gallery_url, pa.table({"face_id_sha256": new_erased}, schema=ERASED_SCHEMA),
                                       subdir=ERASED_DIR, schema=ERASED_SCHEMA, storage_options=storage_options))
    if written:
        old = tuple(t.path for t in gallery.tombstones) if present else ()  # consolidated into the new file
        commit(gallery_url, Delta(add=tuple(written), remove=old), storage_options)
    return {"deleted": len(present), "unknown": sorted(set(face_ids) - present - already),
            "already_deleted": len(set(face_ids) & already)}


def _paired_kinds(gallery: Gallery, i: int) -> list[tuple[str, FileEntry, pa.Schema]]:
    """(directory, manifest entry, schema) of the shards paired with code shard ``i``."""
    out = []
    if gallery.has_features:
        out.append((FEATURES_DIR, gallery.features[i], feature_schema(gallery.D)))
    if gallery.has_refine:
        out.append((REFINE_DIR, gallery.refine[i], refine_schema(gallery.refine_bytes)))
    return out


def compact(gallery_url: str, storage_options: dict | None = None) -> dict:
    """Rewrite the shards holding tombstoned faces without them and drop the tombstones; rewrite
    the rejects files holding erased faces (``erased_hashes``: deleted ever, encoded or not) without
    them, so no file the manifest lists names a deleted face; merge the erasure records into one.

    Each rewritten shard takes its original's place in the manifest (its paired shards theirs),
    so the surviving faces keep their scan order and equal-score ties resolve as before. Holds
    the gallery's writer lease (storage.lease): one writer per gallery."""
    with lease.held(gallery_url, f"opqn gallery compact {gallery_url}", storage_options=storage_options):
        return _compact(gallery_url, storage_options)


def _erasure_rewrites(gallery_url: str, storage_options: dict | None) -> tuple[dict, int, int]:
    """({old path: [its rewrite] or []}, rejects files rewritten, reject rows dropped): the listed
    rejects files that hold erased faces (encode's rejects name faces it could not decode, deleted
    ones included) without those rows, and the erasure records merged into one file (each delete
    adds one; encode reads them all)."""
    manifest = read_manifest(gallery_url, storage_options)
    erased = erased_hashes(gallery_url, storage_options)
    replacing, dropped = {}, 0
    for entry in manifest.files if manifest and erased else ():
        if not entry.path.startswith(REJECTS_DIR + "/"):
            continue
        table = read_table(urls.join(gallery_url, entry.path), storage_options=storage_options)
        keep = pa.array([face_id_hash(f) not in erased for f in table.column("face_id").to_pylist()], pa.bool_())
        if keep.true_count == table.num_rows:
            continue
        dropped += table.num_rows - keep.true_count
        kept = table.filter(keep).cast(REJECT_SCHEMA)
        replacing[entry.path] = [write_data_file(gallery_url, kept, subdir=REJECTS_DIR, schema=REJECT_SCHEMA,
                                                 storage_options=storage_options)] if kept.num_rows else []
    rejects = len(replacing)
    records = [f.path for f in manifest.files if f.path.startswith(ERASED_DIR + "/")] if manifest else []
    if len(records) > 1:  # one record in the first one's place
        merged = write_data_file(gallery_url, pa.table({"face_id_sha256": sorted(erased)}, schema=ERASED_SCHEMA),
                                 subdir=ERASED_DIR, schema=ERASED_SCHEMA, storage_options=storage_options)
        replacing.update({path: [merged] if i == 0 else [] for i, path in enumerate(records)})
    return replacing, rejects, dropped


def _compact(gallery_url: str, storage_options: dict | None) -> dict:
    gallery = require_gallery(gallery_url, storage_options)
    replacing, rejects_rewritten, rejects_dropped = _erasure_rewrites(gallery_url, storage_options)
    if not gallery.tombstones and not replacing:
        return {"rewritten": 0, "removed_faces": 0, "tombstones_dropped": 0, "rejects_rewritten": 0,
                "removed_rejects": 0}
    schema = code_schema(gallery.M, gallery.K)
    dead = pa.array(sorted(deleted_ids(gallery, storage_options)), pa.string())
    removed, dropped, erasure_rewrites = list(replacing), 0, len(replacing)
    for i, entry in enumerate(gallery.shards if gallery.tombstones else ()):
        table = read_table(urls.join(gallery_url, entry.path), storage_options=storage_options)
        mask = pc.is_in(table.column("face_id"), dead)
        hits = pc.sum(mask).as_py() or 0
        if not hits:
            continue
        dropped += hits
        removed.append(entry.path)
        paired, pentries = {}, []  # directory -> its table without the deleted rows, of each paired shard
        for directory, pentry, pschema in _paired_kinds(gallery, i):
            ptable = read_table(urls.join(gallery_url, pentry.path), storage_options=storage_options)
            if not ptable.column("face_id").equals(table.column("face_id")):
                raise ValueError(f"gallery {gallery_url}: {directory} shard {pentry.path} does not hold the faces of "
                                 f"{entry.path} row for row; not compacting")
            removed.append(pentry.path)
            pentries.append(pentry.path)
            paired[directory] = ptable.filter(pc.invert(mask)).cast(pschema)  # same mask: still aligned
        kept = table.filter(pc.invert(mask))
        new = write_code_shard(gallery_url, kept.cast(schema), paired, storage_options) if kept.num_rows else []
        # code shard first, then each paired shard, each where its original was listed
        for old, entry in zip([entry.path] + pentries, new or [None] * (1 + len(pentries))):
            replacing[old] = [entry] if entry is not None else []
    tombstones = {t.path for t in gallery.tombstones}

    def change(current: Manifest) -> Manifest:
        listed = {f.path for f in current.files}
        if not set(removed) <= listed or not tombstones <= listed:
            raise RuntimeError(f"gallery {gallery_url} changed during compaction; run compact again")
        listing = []
        for f in current.files:
            if f.path in replacing:
                listing += replacing[f.path]
            elif f.path not in tombstones:
                listing.append(f)
        return replace(current, files=tuple(listing))

    commit(gallery_url, change, storage_options)
    return {"rewritten": len(removed) - erasure_rewrites, "removed_faces": dropped,
            "tombstones_dropped": len(tombstones), "rejects_rewritten": rejects_rewritten,
            "removed_rejects": rejects_dropped}
