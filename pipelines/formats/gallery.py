"""The gallery format: code shards, paired feature and refine shards, tombstones, the refine
quantizer file and the manifest metadata. Its only reader and writer.

``<gallery>/codes/part-*.parquet``: face_id string, identity string (nullable), codes
fixed-size list of M unsigned integers (``code_type(K)``: uint8 when K <= 256, else uint16, as
``model.opqn.code_dtype``). Rows of one source face shard, sorted by face_id, at most
``shard_rows`` a file.
``<gallery>/features/part-*.parquet`` (only in a gallery encoded with ``--store-features``):
face_id string, feature fixed-size list of D float16, the model's l2-normalised float feature
(the vector whose cosine is evaluation's "float" upper bound), for exact re-ranking.
``<gallery>/refine/part-*.parquet`` (only in a gallery encoded with ``--refine-bytes B``):
face_id string, refine fixed-size list of B uint8, the face's refine code (``model.refine``: a
B-byte product quantizer over the same normalised feature). A feature or refine shard pairs
with the code shard of the same file name (``codes/part-X.parquet`` <-> ``features/part-X.parquet``):
same rows in the same order, in row groups of ``FEATURE_ROW_GROUP`` (re-ranking reads only the
groups holding candidates), listed in the same commit and removed together by compaction.
``<gallery>/quantizer/refine-<sha>.npz``: the refine quantizer (float32 arrays, no pickle),
trained by the gallery's first encode and reused by every later one and by queries.
``<gallery>/tombstones/part-*.parquet``: face_id of deleted faces (until compaction).
``<gallery>/rejects/part-*.parquet``: face_id, source, reason of faces encode could not decode.
``<gallery>/erased/part-*.parquet``: face_id_sha256 of every face ever deleted (``face_id_hash``),
kept through compaction, so a later encode never adds a deleted face again (even one deleted
before it was encoded); it names faces by hash, not id, since it outlives their data.
``<gallery>/manifest.json`` (storage.manifest) lists every file; its metadata holds the kind,
the format version, the model id, D, M, K, the codebook scheme, the source shards already
encoded (source key -> fingerprint: the watermark of incremental runs), in a gallery with
features a ``features`` entry (``{"dtype": "float16", "normalized": true}``) and in a gallery
with refine codes a ``refine`` entry (bytes, nbits, dim, transform, scoring, the quantizer
file's manifest entry, the faces it was trained on), and in a gallery with its own codes
(``opqn encode --codes gallery``, codebook scheme ``gallery-pq``) a ``codebook`` entry of the
same form: its codes are then that quantizer's M bytes (``quantizer/codes-<sha>.npz``), not the
model's assignment. A gallery is bound to one model id and one code source, and is
with or without features, and with or without refine codes (of one size), for its whole life.

This module defines the layout and reads it (``open_gallery``, the shard readers, the
quantizer file); ``pipelines.formats.gallery_writer`` writes it (shards, quantizer file,
commits of encoded sources, tombstones, compaction).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from model.opqn import code_dtype
from model.refine import NBITS, RefineQuantizer
from storage import files, urls
from storage.manifest import FileEntry, read_manifest
from storage.tables import iter_batches, read_table

KIND = "opqn-gallery"
FORMAT_VERSION = 1
CODES_DIR = "codes"
TOMBSTONES_DIR = "tombstones"
FEATURES_DIR = "features"
REFINE_DIR = "refine"
REJECTS_DIR = "rejects"
QUANTIZER_DIR = "quantizer"
ERASED_DIR = "erased"
FEATURES_META = {"dtype": "float16", "normalized": True}  # the manifest's "features" entry
# Rows per Parquet row group of a feature (or refine) shard: re-ranking reads only the row groups
# that hold candidates, so a task holds at most this many features at once (8 MiB at D = 1024).
FEATURE_ROW_GROUP = 4096


def code_numpy_dtype(K: int) -> np.dtype:
    """numpy dtype of a code of K codewords (``model.opqn.code_dtype``: uint8 or uint16)."""
    return np.dtype(str(code_dtype(K)).removeprefix("torch."))


def code_type(K: int) -> pa.DataType:
    return pa.from_numpy_dtype(code_numpy_dtype(K))


def code_bytes(M: int, K: int) -> int:
    """Bytes of one face's code."""
    return M * code_numpy_dtype(K).itemsize


def code_schema(M: int, K: int) -> pa.Schema:
    return pa.schema([("face_id", pa.string()), ("identity", pa.string()), ("codes", pa.list_(code_type(K), M))])


def feature_schema(D: int) -> pa.Schema:
    return pa.schema([("face_id", pa.string()), ("feature", pa.list_(pa.float16(), D))])


def refine_schema(B: int) -> pa.Schema:
    return pa.schema([("face_id", pa.string()), ("refine", pa.list_(pa.uint8(), B))])


TOMBSTONE_SCHEMA = pa.schema([("face_id", pa.string())])
ERASED_SCHEMA = pa.schema([("face_id_sha256", pa.string())])
REJECT_SCHEMA = pa.schema([("face_id", pa.string()), ("source", pa.string()), ("reason", pa.string())])


def paired_path(code_path: str, directory: str) -> str:
    """The shard under ``directory`` that pairs with a code shard: the same file name."""
    return f"{directory}/{code_path.rsplit('/', 1)[-1]}"


def feature_path(code_path: str) -> str:
    return paired_path(code_path, FEATURES_DIR)


def _list_table(columns: dict, column: str, values: np.ndarray, schema: pa.Schema) -> pa.Table:
    """A table of ``schema``: plain ``columns`` (Arrow arrays, lists or numpy arrays) plus the
    fixed-size list ``column`` from (n, size) ``values``."""
    value_type = schema.field(column).type
    flat = pa.array(np.ascontiguousarray(values).reshape(-1), type=value_type.value_type)
    return pa.table({**{k: v if isinstance(v, pa.Array) else pa.array(v, schema.field(k).type)
                        for k, v in columns.items()},
                     column: pa.FixedSizeListArray.from_arrays(flat, value_type.list_size)}, schema=schema)


def code_table(face_ids, identities, codes, M: int, K: int) -> pa.Table:
    """A code shard's table from face ids, identities (None allowed) and (n, M) codes."""
    return _list_table({"face_id": face_ids, "identity": identities}, "codes",
                       np.asarray(codes, dtype=code_numpy_dtype(K)), code_schema(M, K))


def feature_table(face_ids, features, D: int) -> pa.Table:
    """A feature shard's table from face ids and (n, D) features (stored as float16)."""
    return _list_table({"face_id": face_ids}, "feature", np.asarray(features, dtype=np.float16),
                       feature_schema(D))


def refine_table(face_ids, codes, B: int) -> pa.Table:
    """A refine shard's table from face ids and (n, B) uint8 refine codes."""
    return _list_table({"face_id": face_ids}, "refine", np.asarray(codes, dtype=np.uint8), refine_schema(B))


def list_matrix(table: pa.Table, column: str, size: int, value_types: tuple, what: str) -> np.ndarray:
    """A fixed-size list column (codes, features, refine codes) of one of ``value_types`` as an
    (N, size) array, checked; errors name ``what`` (the shard)."""
    col = table.column(column).combine_chunks()
    if not pa.types.is_fixed_size_list(col.type) or col.type.list_size != size or col.type.value_type not in value_types:
        raise ValueError(f"{what}: column {column} is {col.type}, expected a fixed-size list of {size} "
                         f"{' or '.join(map(str, value_types))}")
    if col.null_count:
        raise ValueError(f"{what}: {col.null_count} rows have no {column}")
    return col.flatten().to_numpy(zero_copy_only=False).reshape(len(col), size)


def feature_matrix(table: pa.Table, D: int, url: str) -> np.ndarray:
    """The ``feature`` column of (part of) a feature shard as an (N, D) float16 array, checked."""
    return list_matrix(table, "feature", D, (pa.float16(),), f"feature shard {url}")


def refine_matrix(table: pa.Table, B: int, url: str) -> np.ndarray:
    """The ``refine`` column of (part of) a refine shard as an (N, B) uint8 array, checked."""
    return list_matrix(table, "refine", B, (pa.uint8(),), f"refine shard {url}")


def read_codes(url: str, M: int, storage_options: dict | None = None) -> tuple[pa.Array, np.ndarray]:
    """(face_id array, codes (N, M) uint8/uint16) of one code shard."""
    table = read_table(url, columns=["face_id", "codes"], storage_options=storage_options)
    codes = list_matrix(table, "codes", M, (pa.uint8(), pa.uint16()), f"code shard {url}")
    return table.column("face_id").combine_chunks(), codes


def read_features(url: str, D: int, storage_options: dict | None = None) -> tuple[pa.Array, np.ndarray]:
    """(face_id array, features (N, D) float16) of one feature shard."""
    table = read_table(url, columns=["face_id", "feature"], storage_options=storage_options)
    return table.column("face_id").combine_chunks(), feature_matrix(table, D, url)


def read_refine(url: str, B: int, storage_options: dict | None = None) -> tuple[pa.Array, np.ndarray]:
    """(face_id array, refine codes (N, B) uint8) of one refine shard."""
    table = read_table(url, columns=["face_id", "refine"], storage_options=storage_options)
    return table.column("face_id").combine_chunks(), refine_matrix(table, B, url)


def live_rows(face_ids: pa.Array, deleted: pa.Array | None) -> np.ndarray | None:
    """Indices of the rows not tombstoned, or None when every row is live."""
    if deleted is None or not len(deleted):
        return None
    live = np.asarray(pc.invert(pc.is_in(face_ids, value_set=deleted)).fill_null(True))
    return None if live.all() else np.flatnonzero(live)


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
    refine: tuple[FileEntry, ...] = ()  # refine shards, in the order of their code shards
    refine_meta: dict | None = None  # the manifest's "refine" entry; None: no refine codes
    codebook_meta: dict | None = None  # the manifest's "codebook" entry; None: the model's own codes

    @property
    def rows(self) -> int:
        return sum(s.rows for s in self.shards)

    @property
    def bytes_per_code(self) -> int:
        return code_bytes(self.M, self.K)

    @property
    def has_features(self) -> bool:
        return self.feature_meta is not None

    def shard_urls(self) -> list[str]:
        return [urls.join(self.url, s.path) for s in self.shards]

    def feature_urls(self) -> list[str]:
        """URLs of the feature shards, one per code shard in the same order (empty without features)."""
        return [urls.join(self.url, f.path) for f in self.features]

    @property
    def has_refine(self) -> bool:
        return self.refine_meta is not None

    @property
    def refine_bytes(self) -> int:
        return int(self.refine_meta["bytes"]) if self.refine_meta is not None else 0

    def refine_urls(self) -> list[str]:
        """URLs of the refine shards, one per code shard in the same order (empty without refine codes)."""
        return [urls.join(self.url, f.path) for f in self.refine]

    def check_refine(self, refine_bytes: int) -> None:
        """Refuse an encode whose refine setting differs from the gallery's (first encode's)."""
        if refine_bytes == self.refine_bytes:
            return
        if not self.has_refine:
            raise ValueError(f"gallery {self.url} was encoded without refine codes; encoding into it with "
                             f"--refine-bytes {refine_bytes} would leave some faces without one: encode into a new "
                             f"gallery, or encode without --refine-bytes")
        raise ValueError(f"gallery {self.url} stores {self.refine_bytes}-byte refine codes; encoding into it with "
                         f"--refine-bytes {refine_bytes} would mix {'no' if not refine_bytes else 'other'} refine "
                         f"codes in: pass --refine-bytes {self.refine_bytes} (a gallery keeps the refine setting "
                         f"of its first encode)")

    @property
    def codes_source(self) -> str:
        return "gallery" if self.codebook_meta is not None else "model"

    def check_codes(self, codes: str) -> None:
        """Refuse an encode whose code source differs from the gallery's (first encode's)."""
        if codes != self.codes_source:
            raise ValueError(f"gallery {self.url} holds {self.codes_source} codes; encoding into it with --codes "
                             f"{codes} would mix two kinds of codes: pass --codes {self.codes_source} (a gallery "
                             f"keeps the code source of its first encode), or encode into a new gallery")

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
                     store_features: bool = False, refine: dict | None = None, codebook: dict | None = None) -> dict:
    meta = {"kind": KIND, "format_version": FORMAT_VERSION, "model_id": model_id, "D": D, "M": M, "K": K,
            "codebook_scheme": codebook_scheme, "encoded_sources": encoded_sources}
    if store_features:  # codes-only galleries keep exactly the metadata they always had
        meta["features"] = dict(FEATURES_META)
    if refine is not None:
        meta["refine"] = dict(refine)
    if codebook is not None:
        meta["codebook"] = dict(codebook)
    return meta


def _paired(url: str, shards: tuple[FileEntry, ...], listed_files, directory: str, meta: dict | None,
            key: str) -> tuple[FileEntry, ...]:
    """The shards under ``directory`` in the order of their code shards, checked one per code shard."""
    listed = {f.path: f for f in listed_files if f.path.startswith(directory + "/")}
    if meta is None:
        if listed:
            raise ValueError(f"gallery {url} lists {len(listed)} {directory} shards but its metadata has no "
                             f"{key!r} entry")
        return ()
    missing = [s.path for s in shards if paired_path(s.path, directory) not in listed]
    bad = [s.path for s in shards if paired_path(s.path, directory) in listed
           and listed[paired_path(s.path, directory)].rows != s.rows]
    if missing or bad or len(listed) != len(shards):
        raise ValueError(f"gallery {url} is inconsistent: its {directory} shards do not pair with its code shards "
                         f"(without a {directory} shard: {missing[:3]}, row counts differ: {bad[:3]}, "
                         f"{len(listed)} {directory} vs {len(shards)} code shards)")
    return tuple(listed[paired_path(s.path, directory)] for s in shards)


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
    feature_meta, refine_meta, codebook_meta = meta.get("features"), meta.get("refine"), meta.get("codebook")
    if feature_meta is not None and feature_meta.get("dtype") != FEATURES_META["dtype"]:
        raise ValueError(f"gallery {url} stores features as {feature_meta.get('dtype')!r}, this opqn reads "
                         f"{FEATURES_META['dtype']!r}")
    for key, entry in (("refine", refine_meta), ("codebook", codebook_meta)):
        if entry is not None and (entry.get("nbits") != NBITS or not entry.get("quantizer")):
            raise ValueError(f"gallery {url} has a {key} entry this opqn cannot read ({entry.get('nbits')!r}-bit "
                             f"codes, quantizer {entry.get('quantizer')!r}); it reads {NBITS}-bit codes")
    features = _paired(url, shards, manifest.files, FEATURES_DIR, feature_meta, "features")
    refine = _paired(url, shards, manifest.files, REFINE_DIR, refine_meta, "refine")
    return Gallery(url=url, model_id=meta["model_id"], D=meta["D"], M=meta["M"], K=meta["K"],
                   codebook_scheme=meta["codebook_scheme"], shards=shards,
                   tombstones=tuple(f for f in manifest.files if f.path.startswith(TOMBSTONES_DIR + "/")),
                   encoded_sources=dict(meta.get("encoded_sources", {})), generation=manifest.generation,
                   features=features, feature_meta=dict(feature_meta) if feature_meta is not None else None,
                   refine=refine, refine_meta=dict(refine_meta) if refine_meta is not None else None,
                   codebook_meta=dict(codebook_meta) if codebook_meta is not None else None)


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


def face_id_hash(face_id: str) -> str:
    """How the erasure record names a face: its id's sha256 (the record outlives the face's data)."""
    return hashlib.sha256(face_id.encode()).hexdigest()


def erased_hashes(gallery_url: str, storage_options: dict | None = None) -> frozenset:
    """``face_id_hash`` of every face ever deleted from the gallery: encodes skip them for good."""
    manifest = read_manifest(gallery_url, storage_options)
    out: set[str] = set()
    for entry in manifest.files if manifest else ():
        if entry.path.startswith(ERASED_DIR + "/"):
            out.update(read_table(urls.join(gallery_url, entry.path), ["face_id_sha256"], storage_options)
                       .column(0).to_pylist())
    return frozenset(out)


def read_quantizer(gallery_url: str, entry: dict, storage_options: dict | None = None) -> RefineQuantizer:
    """The quantizer file (refine or gallery codes) named by a manifest entry (path, size, sha256), checked."""
    url = urls.join(gallery_url, entry["path"])
    data = files.read_all(url, storage_options)
    if len(data) != entry["size"] or hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise ValueError(f"quantizer {url} does not match the gallery manifest (size {len(data)} vs "
                         f"{entry['size']}, or another sha256): the gallery is damaged")
    return RefineQuantizer.from_bytes(data, url)


def load_quantizer(gallery: Gallery, storage_options: dict | None = None, kind: str = "refine") -> RefineQuantizer:
    """The gallery's refine quantizer (``kind="refine"``) or the quantizer of its own codes
    (``kind="codebook"``), checked against the manifest (size, sha256, bytes, D)."""
    meta, want = ((gallery.refine_meta, gallery.refine_bytes) if kind == "refine" else (gallery.codebook_meta, gallery.M))
    if meta is None:
        raise ValueError(f"gallery {gallery.url} has no {kind} quantizer (encode it with "
                         f"{'--refine-bytes B' if kind == 'refine' else '--codes gallery'})")
    quantizer = read_quantizer(gallery.url, meta["quantizer"], storage_options)
    if quantizer.bytes != want or quantizer.D != gallery.D:
        url = urls.join(gallery.url, meta["quantizer"]["path"])
        raise ValueError(f"{kind} quantizer {url} makes {quantizer.bytes}-byte codes of D={quantizer.D} features, "
                         f"the gallery manifest says {want} bytes, D={gallery.D}")
    return quantizer
