"""Galleries: code shards plus a manifest, as in the data contract of docs/architecture.

``<gallery>/codes/part-*.parquet``: face_id string, identity string (nullable), codes
fixed-size list of M unsigned integers (uint8 when K <= 256, else uint16).
``<gallery>/tombstones/part-*.parquet``: face_id of deleted faces (until compaction).
``<gallery>/manifest.json`` (storage.manifest) lists both kinds of file; its metadata holds
the format version, the model id, D, M, K, the codebook scheme and the source shards already
encoded (the watermark for incremental runs). A gallery is bound to one model id.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import pyarrow as pa

from storage import urls
from storage.manifest import FileEntry, read_manifest
from storage.tables import iter_batches

KIND = "opqn-gallery"
FORMAT_VERSION = 1
CODES_DIR = "codes"
TOMBSTONES_DIR = "tombstones"


def code_type(K: int) -> pa.DataType:
    return pa.uint8() if K <= 256 else pa.uint16()


def code_schema(M: int, K: int) -> pa.Schema:
    return pa.schema([("face_id", pa.string()), ("identity", pa.string()), ("codes", pa.list_(code_type(K), M))])


TOMBSTONE_SCHEMA = pa.schema([("face_id", pa.string())])


@dataclass(frozen=True)
class Gallery:
    url: str
    model_id: str
    D: int
    M: int
    K: int
    codebook_scheme: str
    shards: tuple[FileEntry, ...]
    tombstones: tuple[FileEntry, ...] = ()
    encoded_sources: dict = field(default_factory=dict)  # source shard URL -> sha256
    generation: int = 0

    @property
    def rows(self) -> int:
        return sum(s.rows for s in self.shards)

    def shard_urls(self) -> list[str]:
        return [urls.join(self.url, s.path) for s in self.shards]

    def check_model(self, model_id: str | None, D: int, M: int, K: int) -> None:
        """Refuse a model other than the one that encoded this gallery."""
        if (self.D, self.M, self.K) != (D, M, K):
            raise ValueError(f"gallery {self.url} holds codes for D={self.D}, M={self.M}, K={self.K} but the "
                             f"model has D={D}, M={M}, K={K}")
        if model_id is not None and model_id != self.model_id:
            raise ValueError(f"gallery {self.url} was encoded by model {self.model_id}, not {model_id}: "
                             f"codes from different models are not comparable; encode into a new gallery")


def gallery_metadata(model_id: str, D: int, M: int, K: int, codebook_scheme: str, encoded_sources: dict) -> dict:
    return {"kind": KIND, "format_version": FORMAT_VERSION, "model_id": model_id, "D": D, "M": M, "K": K,
            "codebook_scheme": codebook_scheme, "encoded_sources": encoded_sources}


def open_gallery(url: str, storage_options: dict | None = None) -> Gallery | None:
    """The gallery at ``url``, or None if nothing was ever committed there."""
    manifest = read_manifest(url, storage_options)
    if manifest is None:
        return None
    meta = manifest.metadata
    if meta.get("kind") != KIND:
        raise ValueError(f"{url} is not an opqn gallery (manifest kind {meta.get('kind')!r})")
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"gallery {url} has format version {meta.get('format_version')}, this opqn reads {FORMAT_VERSION}")
    return Gallery(url=url, model_id=meta["model_id"], D=meta["D"], M=meta["M"], K=meta["K"],
                   codebook_scheme=meta["codebook_scheme"],
                   shards=tuple(f for f in manifest.files if f.path.startswith(CODES_DIR + "/")),
                   tombstones=tuple(f for f in manifest.files if f.path.startswith(TOMBSTONES_DIR + "/")),
                   encoded_sources=dict(meta.get("encoded_sources", {})), generation=manifest.generation)


def require_gallery(url: str, storage_options: dict | None = None) -> Gallery:
    gallery = open_gallery(url, storage_options)
    if gallery is None:
        raise FileNotFoundError(f"no gallery at {url} (no manifest.json): encode one with `opqn encode`")
    return gallery


def deleted_ids(gallery: Gallery, storage_options: dict | None = None) -> set[str]:
    """Face ids tombstoned in the gallery (not yet compacted away)."""
    out: set[str] = set()
    for entry in gallery.tombstones:
        for batch in iter_batches(urls.join(gallery.url, entry.path), columns=["face_id"], storage_options=storage_options):
            out.update(batch.column(0).to_pylist())
    return out
