"""Storage: URLs, Parquet tables, manifests and checkpoint bytes on local disk or S3.

Modules (import them directly; this package imports nothing eagerly and never torch):
``urls`` (addressing), ``files`` (atomic whole-object I/O), ``tables`` (streamed
Parquet), ``manifest`` (dataset/gallery manifests with compare-and-swap commits),
``lease`` (one writer per dataset or gallery), ``checkpoints`` (checkpoint bytes),
``errors`` (exceptions). See docs/storage.md.
"""
