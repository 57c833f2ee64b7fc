"""Galleries: code shards plus a manifest, as in the data contract of docs/architecture.

``<gallery>/codes/part-*.parquet``: face_id string, identity string (nullable), codes
fixed-size list of M unsigned integers (uint8 when K <= 256, else uint16).
``<gallery>/tombstones/part-*.parquet``: face_id of deleted faces (until compaction).
``<gallery>/features/part-*.parquet`` (only in a gallery encoded with ``--store-features``):
face_id string, feature fixed-size list of D float16, the model's l2-normalised float feature
(the vector whose cosine is evaluation's "float" upper bound), for exact re-ranking. Each
feature shard pairs with the code shard of the same file name (``codes/part-X.parquet`` <->
``features/part-X.parquet``): same rows in the same order, listed in the same commit and
removed together by compaction.
``<gallery>/manifest.json`` (storage.manifest) lists every kind of file; its metadata holds
the format version, the model id, D, M, K, the codebook scheme, the source shards already
encoded (the watermark for incremental runs) and, in a gallery with features only, a
``features`` entry (``{"dtype": "float16", "normalized": true}``). A gallery is bound to one
model id, and is either with or without features for its whole life.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from storage import urls
from storage.manifest import FileEntry, read_manifest
from storage.tables import iter_batches, read_table, write_table

KIND = "opqn-gallery"
FORMAT_VERSION = 1
CODES_DIR = "codes"
TOMBSTONES_DIR = "tombstones"
FEATURES_DIR = "features"
FEATURES_META = {"dtype": "float16", "normalized": True}  # the manifest's "features" entry
# Rows per Parquet row group of a feature shard: re-ranking reads only the row groups that hold
# candidates, so a task holds at most this many features at once (8 MiB at D = 1024).
FEATURE_ROW_GROUP = 4096


def code_type(K: int) -> pa.DataType:
    return pa.uint8() if K <= 256 else pa.uint16()


def code_schema(M: int, K: int) -> pa.Schema:
    return pa.schema([("face_id", pa.string()), ("identity", pa.string()), ("codes", pa.list_(code_type(K), M))])


TOMBSTONE_SCHEMA = pa.schema([("face_id", pa.string())])


def feature_schema(D: int) -> pa.Schema:
    return pa.schema([("face_id", pa.string()), ("feature", pa.list_(pa.float16(), D))])


def feature_path(code_path: str) -> str:
    """The feature shard that pairs with a code shard: same file name under features/."""
    return f"{FEATURES_DIR}/{code_path.rsplit('/', 1)[-1]}"


def feature_table(face_ids: list[str], features, D: int) -> pa.Table:
    """A feature shard's table from face ids and (n, D) features (stored as float16)."""
    flat = pa.array(np.ascontiguousarray(features, dtype=np.float16).reshape(-1), type=pa.float16())
    return pa.table({"face_id": pa.array(face_ids, pa.string()),
                     "feature": pa.FixedSizeListArray.from_arrays(flat, D)}, schema=feature_schema(D))


def feature_matrix(table: pa.Table, D: int, url: str) -> np.ndarray:
    """The ``feature`` column of (part of) a feature shard as an (N, D) float16 array, checked."""
    col = table.column("feature").combine_chunks()
    if not pa.types.is_fixed_size_list(col.type) or col.type.list_size != D or col.type.value_type != pa.float16():
        raise ValueError(f"feature shard {url}: column feature is {col.type}, expected a fixed-size list of "
                         f"{D} float16")
    if col.null_count:
        raise ValueError(f"feature shard {url}: {col.null_count} rows have no feature")
    return col.flatten().to_numpy(zero_copy_only=False).reshape(len(col), D)


def read_features(url: str, D: int, storage_options: dict | None = None) -> tuple[pa.Array, np.ndarray]:
    """(face_id array, features (N, D) float16) of one feature shard."""
    table = read_table(url, columns=["face_id", "feature"], storage_options=storage_options)
    return table.column("face_id").combine_chunks(), feature_matrix(table, D, url)


def write_feature_shard(gallery_url: str, code_entry: FileEntry, table: pa.Table,
                        storage_options: dict | None = None) -> FileEntry:
    """Write the feature shard paired with ``code_entry`` (not listed until committed)."""
    if table.num_rows != code_entry.rows:
        raise ValueError(f"feature shard for {code_entry.path} has {table.num_rows} rows, the code shard "
                         f"{code_entry.rows}")
    path = feature_path(code_entry.path)
    written = write_table(urls.join(gallery_url, path), table, table.schema, storage_options, exclusive=True,
                          row_group_size=FEATURE_ROW_GROUP)
    return FileEntry(path=path, rows=written.rows, size=written.size, sha256=written.sha256)


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
    features: tuple[FileEntry, ...] = ()  # feature shards, in the order of their code shards
    feature_meta: dict | None = None  # the manifest's "features" entry; None: codes only

    @property
    def rows(self) -> int:
        return sum(s.rows for s in self.shards)

    @property
    def has_features(self) -> bool:
        return self.feature_meta is not None

    def shard_urls(self) -> list[str]:
        return [urls.join(self.url, s.path) for s in self.shards]

    def feature_urls(self) -> list[str]:
        """URLs of the feature shards, one per code shard in the same order (empty without features)."""
        return [urls.join(self.url, f.path) for f in self.features]

    def check_features(self, store_features: bool) -> None:
        """Refuse to mix codes-only and with-features encodings in one gallery."""
        if store_features and not self.has_features:
            raise ValueError(f"gallery {self.url} was encoded without float features (codes only); encoding into it "
                             f"with --store-features would leave some faces without features: encode into a new "
                             f"gallery, or encode without --store-features")
        if not store_features and self.has_features:
            raise ValueError(f"gallery {self.url} stores float features for re-ranking; encoding into it without "
                             f"--store-features would leave faces without features: pass --store-features "
                             f"(a gallery is either with or without features)")

    def check_model(self, model_id: str | None, D: int, M: int, K: int) -> None:
        """Refuse a model other than the one that encoded this gallery."""
        if (self.D, self.M, self.K) != (D, M, K):
            raise ValueError(f"gallery {self.url} holds codes for D={self.D}, M={self.M}, K={self.K} but the "
                             f"model has D={D}, M={M}, K={K}")
        if model_id is not None and model_id != self.model_id:
            raise ValueError(f"gallery {self.url} was encoded by model {self.model_id}, not {model_id}: "
                             f"codes from different models are not comparable; encode into a new gallery")


def gallery_metadata(model_id: str, D: int, M: int, K: int, codebook_scheme: str, encoded_sources: dict,
                     store_features: bool = False) -> dict:
    meta = {"kind": KIND, "format_version": FORMAT_VERSION, "model_id": model_id, "D": D, "M": M, "K": K,
            "codebook_scheme": codebook_scheme, "encoded_sources": encoded_sources}
    if store_features:  # codes-only galleries keep exactly the metadata they always had
        meta["features"] = dict(FEATURES_META)
    return meta


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
    shards = tuple(f for f in manifest.files if f.path.startswith(CODES_DIR + "/"))
    listed = {f.path: f for f in manifest.files if f.path.startswith(FEATURES_DIR + "/")}
    feature_meta = meta.get("features")
    features: tuple[FileEntry, ...] = ()
    if feature_meta is not None:
        if feature_meta.get("dtype") != FEATURES_META["dtype"]:
            raise ValueError(f"gallery {url} stores features as {feature_meta.get('dtype')!r}, this opqn reads "
                             f"{FEATURES_META['dtype']!r}")
        missing = [s.path for s in shards if feature_path(s.path) not in listed]
        bad = [s.path for s in shards if feature_path(s.path) in listed and listed[feature_path(s.path)].rows != s.rows]
        if missing or bad or len(listed) != len(shards):
            raise ValueError(f"gallery {url} is inconsistent: its feature shards do not pair with its code shards "
                             f"(without a feature shard: {missing[:3]}, row counts differ: {bad[:3]}, "
                             f"{len(listed)} feature vs {len(shards)} code shards)")
        features = tuple(listed[feature_path(s.path)] for s in shards)
    elif listed:
        raise ValueError(f"gallery {url} lists {len(listed)} feature shards but its metadata has no 'features' entry")
    return Gallery(url=url, model_id=meta["model_id"], D=meta["D"], M=meta["M"], K=meta["K"],
                   codebook_scheme=meta["codebook_scheme"], shards=shards,
                   tombstones=tuple(f for f in manifest.files if f.path.startswith(TOMBSTONES_DIR + "/")),
                   encoded_sources=dict(meta.get("encoded_sources", {})), generation=manifest.generation,
                   features=features, feature_meta=dict(feature_meta) if feature_meta is not None else None)


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
