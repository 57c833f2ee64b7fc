"""``opqn forget``: erase faces from a dataset and from every gallery encoded from it.

One run holds the dataset's writer lease and the writer lease of every gallery the dataset
records (``pipelines.formats.face_erasure``), so no prepare or encode runs meanwhile. In each
gallery the faces are tombstoned (queries skip them at once) and the shards holding them are
compacted away (codes, paired features and refine codes, and encode's rejects naming them);
then the dataset's face shards are rewritten without them in one commit, which re-checks that
no gallery was recorded meanwhile (else that gallery is erased too and the commit
retried). After it, later encodes (incremental, or of a new model into a new gallery) and
training read only the rewritten shards, and a re-prepare of the same photos skips them (their
``sources`` records stay). The superseded files stay on storage for readers of older manifests
until ``storage.vacuum`` deletes them.
"""
from __future__ import annotations

import contextlib

from pipelines.formats.face_erasure import GalleriesChanged, find_faces, recorded_galleries, remove_faces
from pipelines.formats.gallery import open_gallery
from pipelines.formats.gallery_writer import compact, delete_faces
from storage import lease, urls


def forget(dataset: str, identities=(), face_ids=(), storage_options: dict | None = None) -> dict:
    """Erase the faces of ``identities`` and the faces ``face_ids`` everywhere; returns counts.
    ``storage_options`` (s3fs options over the environment) serve the dataset and its galleries."""
    if not identities and not face_ids:
        raise ValueError("nothing to forget: give identities or face ids")
    dataset = urls.absolute(dataset)
    with contextlib.ExitStack() as held:
        held.enter_context(lease.held(dataset, f"opqn forget {dataset}", storage_options=storage_options))
        ids = find_faces(dataset, identities, face_ids, storage_options)
        summary = {"dataset": dataset, "faces": len(set(ids)), "unknown_face_ids": sorted(set(face_ids) - set(ids)),
                   "galleries": {}}
        done: list[str] = []
        for _ in range(10):
            for gallery in recorded_galleries(dataset, storage_options):
                if gallery in done:
                    continue
                held.enter_context(lease.held(gallery, f"opqn forget {dataset}", storage_options=storage_options))
                summary["galleries"][gallery] = _erase_in_gallery(gallery, ids, storage_options)
                done.append(gallery)
            try:
                summary.update(remove_faces(dataset, ids, done, storage_options))
                return summary
            except GalleriesChanged:
                continue
        raise RuntimeError(f"galleries of {dataset} kept appearing during the erasure; run forget again")


def _erase_in_gallery(gallery: str, ids: list[str], storage_options: dict | None) -> dict:
    if open_gallery(gallery, storage_options) is None:  # recorded by an encode that committed nothing
        return {"deleted": 0, "removed_faces": 0, "removed_rejects": 0}
    deleted = delete_faces(gallery, ids, storage_options)
    compacted = compact(gallery, storage_options)
    return {"deleted": deleted["deleted"] + deleted["already_deleted"], "removed_faces": compacted["removed_faces"],
            "removed_rejects": compacted["removed_rejects"]}
