"""The one typed config of the ingest stage; the CLI, the Prefect flow and tests build it."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from pipelines.execution import EXECUTORS

SELECTIONS = ("largest", "central", "score")
FORMATS = ("png", "jpeg")
PROTOCOLS = ("single", "cross")


@dataclass(frozen=True)
class IngestConfig:
    """How photos become face rows.

    Crop: ``size`` (112 for real models, 32/64 for CPU work), ``image_format`` png|jpeg.
    Faces: one per photo picked by ``select`` (largest box, most ``central`` big box, or best
    ``score``) unless ``keep_all`` (galleries of group photos); detections under
    ``min_score`` are ignored. The detector sees the photo shrunk to ``detect_max_side``.
    Splits (see ``splits.py``): ``protocol`` single (``query_fraction`` of each identity's
    photos are ``query``, the rest ``database``) or cross (``unseen_fraction`` of identities
    are ``unseen``, the rest ``train``); identities with fewer than ``min_photos`` distinct
    photos are rejected. ``seed`` makes splits reproducible.
    Work: ``shard_size`` photos per output shard (the unit of resume), ``batch_size``
    photos per detector call, ``num_workers`` shards processed at once (default: one per
    CPU), ``executor`` ``ray`` (in-process Ray, or the cluster of ``RAY_ADDRESS``) or ``local``
    (every shard in this process, no Ray: debugging and small jobs).
    """

    size: int = 112
    image_format: str = "png"
    jpeg_quality: int = 95
    select: str = "largest"
    keep_all: bool = False
    min_score: float = 0.9
    min_face_size: int = 20
    thresholds: tuple[float, float, float] = (0.6, 0.7, 0.7)
    detect_max_side: int = 1280
    max_pixels: int = 120_000_000
    max_bytes: int = 64 * 1024 * 1024
    protocol: str = "single"
    query_fraction: float = 0.2
    unseen_fraction: float = 0.2
    min_photos: int = 1
    seed: int = 0
    shard_size: int = 500
    batch_size: int = 16
    num_workers: int | None = None
    torch_threads: int = 1
    executor: str = "ray"
    storage_options: dict = field(default_factory=dict, compare=False)

    def __post_init__(self):
        problems = []
        if not 8 <= self.size <= 1024:
            problems.append(f"size={self.size} (want 8..1024)")
        if self.image_format not in FORMATS:
            problems.append(f"image_format={self.image_format!r} (want one of {FORMATS})")
        if self.select not in SELECTIONS:
            problems.append(f"select={self.select!r} (want one of {SELECTIONS})")
        if self.protocol not in PROTOCOLS:
            problems.append(f"protocol={self.protocol!r} (want one of {PROTOCOLS})")
        if not 0.0 <= self.query_fraction < 1.0:
            problems.append(f"query_fraction={self.query_fraction} (want 0 <= f < 1)")
        if not 0.0 <= self.unseen_fraction < 1.0:
            problems.append(f"unseen_fraction={self.unseen_fraction} (want 0 <= f < 1)")
        if self.min_photos < 1:
            problems.append(f"min_photos={self.min_photos} (want >= 1)")
        if self.shard_size < 1 or self.batch_size < 1:
            problems.append("shard_size and batch_size must be >= 1")
        if self.executor not in EXECUTORS:
            problems.append(f"executor={self.executor!r} (want one of {EXECUTORS})")
        if self.detect_max_side < 64:
            problems.append(f"detect_max_side={self.detect_max_side} (want >= 64)")
        if problems:
            raise ValueError("invalid ingest config: " + "; ".join(problems))

    def recorded(self) -> dict:
        """The settings that shape the rows, stored in the manifest so re-runs can check them."""
        keys = ("size", "image_format", "jpeg_quality", "select", "keep_all", "min_score", "min_face_size",
                "thresholds", "detect_max_side", "protocol", "query_fraction", "unseen_fraction",
                "min_photos", "seed")
        d = dataclasses.asdict(self)
        return {k: (list(d[k]) if isinstance(d[k], tuple) else d[k]) for k in keys}
