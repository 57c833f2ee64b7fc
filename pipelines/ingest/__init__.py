"""Ingest: photos -> MTCNN detection -> 5-point alignment -> face shards (Parquet).

Python API: ``prepare_dataset(source, dataset, IngestConfig(...))``; CLI: ``opqn prepare``.
"""
from .config import IngestConfig

__all__ = ["IngestConfig", "prepare_dataset"]


def prepare_dataset(*args, **kwargs):
    """See ``pipelines.ingest.run.prepare_dataset`` (imported lazily: Ray and torch are heavy)."""
    from .run import prepare_dataset as run

    return run(*args, **kwargs)
