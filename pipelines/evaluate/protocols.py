"""Evaluation datasets and their query/database splits.

A DATASET is either

- an identity-folder image directory (``identity/photo.jpg``: LFW, AT&T faces, VGGFace2), or
- a face-shard dataset written by ingest: ``<dataset>/faces/part-*.parquet`` with columns
  ``face_id``, ``identity``, ``split`` and ``image`` (an encoded, already aligned crop).

Protocols (OPQN Section IV):

- ``single`` (single-domain): queries and database share identities. Folder: each identity's
  photos are split by ``query_split`` (``query_fraction`` of them, at least one, never all,
  chosen by a seeded hash of the file name: the trainer's split, so the database is the
  training set). Shards: the rows whose ``split`` is ``query`` and ``database``.
- ``cross`` (cross-domain): identities the model never saw. Folder: every listed identity;
  shards: the rows whose ``split`` is ``unseen``. Each identity is split into
  ``queries_per_identity`` queries (default 1) or a ``query_fraction`` of its photos, the
  rest is the database.

Every query identity must have at least one database item; otherwise the split is rejected
with the identities named (AP is undefined for such a query).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from pipelines.formats.faces import FaceSet, face_shard_files, is_face_dataset, load_face_dataset, read_face_columns
from pipelines.photo_folder import list_identity_folder, load_face_set, query_split

PROTOCOLS = ("single", "cross")


@dataclass
class EvalSplit:
    queries: FaceSet
    database: FaceSet
    protocol: str
    dataset: str
    source: str  # "folder" or "shards"
    description: str


def check_split(queries: FaceSet, database: FaceSet) -> None:
    """Both sides non-empty and every query identity present in the database."""
    if not len(queries):
        raise ValueError("the split has no queries")
    if not len(database):
        raise ValueError("the split has no database items")
    missing = sorted(set(queries.labels.tolist()) - set(database.labels.tolist()))
    if missing:
        raise ValueError(f"{len(missing)} query identities have no database items, e.g. {missing[:5]}; "
                         f"each identity needs at least one photo more than its queries")


def _key(path: str, seed: int) -> str:
    return hashlib.sha1(f"{seed}:{path.rsplit('/', 1)[-1]}".encode()).hexdigest()


def per_identity_split(labels: np.ndarray, paths: list[str], queries_per_identity: int = 1,
                       query_fraction: float = 0.0, seed: int = 0) -> np.ndarray:
    """Query mask for cross-domain: ``queries_per_identity`` photos of each identity (or
    ``round(query_fraction * n)``, at least one, when a fraction is given), chosen by a seeded
    hash of the file name. An identity left with no database photo is an error."""
    if query_fraction and not 0 < query_fraction < 1:
        raise ValueError(f"query fraction must be in (0, 1), got {query_fraction}")
    if not query_fraction and queries_per_identity < 1:
        raise ValueError(f"queries per identity must be >= 1, got {queries_per_identity}")
    is_query = np.zeros(len(labels), dtype=bool)
    short = []
    for ident in np.unique(labels):
        idx = np.flatnonzero(labels == ident)
        n_query = max(1, int(round(query_fraction * len(idx)))) if query_fraction else queries_per_identity
        if n_query >= len(idx):
            short.append(f"{ident} ({len(idx)} photos)")
            continue
        order = sorted(idx, key=lambda i: _key(paths[i], seed))
        is_query[order[:n_query]] = True
    if short:
        raise ValueError(f"{len(short)} identities would have no database items after taking their queries, "
                         f"e.g. {short[:5]}; raise --min-photos or lower the queries per identity")
    return is_query


def is_shard_dataset(dataset: str) -> bool:
    """A face-shard dataset (``<dataset>/faces/*.parquet``) rather than an image folder."""
    return is_face_dataset(str(dataset))


def read_shards(dataset: str, splits: tuple[str, ...], stored_size: int, crop_fraction: float = 1.0) -> FaceSet:
    """Rows of the face shards whose ``split`` is one of ``splits``, decoded to a FaceSet
    (``paths`` hold the face ids); an error naming the splits present if none match."""
    present = set(read_face_columns(face_shard_files(str(dataset)), ("split",)).column("split").to_pylist())
    if not present & set(splits):
        raise ValueError(f"{dataset} has no faces with split {' or '.join(map(repr, splits))} "
                         f"(splits present: {sorted(s for s in present if s is not None)})")
    return load_face_dataset(str(dataset), splits, stored_size, crop_fraction)


def load_split(dataset: str, protocol: str = "single", stored_size: int = 35, crop_fraction: float = 0.5,
               min_photos: int = 2, max_photos: int | None = None, query_fraction: float = 0.2,
               queries_per_identity: int = 1, seed: int = 0, threads: int = 2) -> EvalSplit:
    """Queries and database of ``dataset`` under ``protocol`` (see the module docstring).

    For the cross protocol ``query_fraction`` is used only when ``queries_per_identity`` is 0.
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    if is_shard_dataset(dataset):
        if protocol == "single":
            queries = read_shards(dataset, ("query",), stored_size, crop_fraction)
            database = read_shards(dataset, ("database",), stored_size, crop_fraction)
            desc = "face shards: split 'query' against split 'database'"
            # ingest splits photos before detection: a person whose other photos held no face has
            # queries and nothing to find; such queries cannot be scored and are left out
            orphan = ~np.isin(queries.labels, database.labels)
            if orphan.any() and not orphan.all():
                queries = queries.subset(np.flatnonzero(~orphan))
                desc += f" ({int(orphan.sum())} queries without a database face of their identity left out)"
        else:
            faces = read_shards(dataset, ("unseen",), stored_size, crop_fraction)
            is_q = per_identity_split(faces.labels, faces.paths, queries_per_identity,
                                      0.0 if queries_per_identity else query_fraction, seed)
            queries, database = faces.subset(np.flatnonzero(is_q)), faces.subset(np.flatnonzero(~is_q))
            desc = ("face shards, split 'unseen': " + (f"{queries_per_identity} queries per identity"
                    if queries_per_identity else f"{query_fraction:g} of each identity as queries") + ", rest database")
        source = "shards"
    else:
        items = list_identity_folder(dataset, min_photos=min_photos, max_photos=max_photos)
        faces = load_face_set(items, stored_size, crop_fraction, threads=threads)
        photos = f"identities with {min_photos}..{max_photos or 'any'} photos"
        if protocol == "single":
            is_q = query_split(faces.labels, faces.paths, query_fraction, seed)
            desc = f"identity folder, {photos}: {query_fraction:g} of each identity's photos as queries (seed {seed}), rest database"
        else:
            is_q = per_identity_split(faces.labels, faces.paths, queries_per_identity,
                                      0.0 if queries_per_identity else query_fraction, seed)
            desc = (f"identity folder, {photos}: " + (f"{queries_per_identity} query per identity"
                    if queries_per_identity else f"{query_fraction:g} of each identity as queries") + f" (seed {seed}), rest database")
        queries, database = faces.subset(np.flatnonzero(is_q)), faces.subset(np.flatnonzero(~is_q))
        source = "folder"
    check_split(queries, database)
    return EvalSplit(queries, database, protocol, str(dataset), source, desc)
