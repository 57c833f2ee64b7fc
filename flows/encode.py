"""Prefect flow ``encode-gallery``: schedules gallery encoding; all logic is in ``pipelines.encode``.

The nightly deployment runs it on the same dataset and gallery every night: each run encodes
only the face shards added since the last one, and a night with nothing new writes nothing.
"""
from __future__ import annotations

from prefect import flow

from flows.options import config_with_options, options_model
from pipelines.encode.run import EncodeConfig

EncodeOptions = options_model(EncodeConfig)


@flow(name="encode-gallery", log_prints=True, retries=1, retry_delay_seconds=30)
def encode_gallery_flow(model_url: str, dataset: str, gallery: str, options: EncodeOptions | None = None) -> dict:
    """Encode DATASET's new face shards with MODEL_URL into GALLERY.

    ``options`` takes any `opqn encode` setting by name (splits, batch_size, shard_rows,
    actors, use_gpu, ...); unknown names are rejected before anything starts.
    """
    cfg = config_with_options(EncodeConfig, "encode", {}, options)
    from pipelines.encode.run import encode_gallery

    return encode_gallery(model_url, dataset, gallery, cfg)
