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

    Crop: ``size`` (112 for real models, 32/64 for CPU work), ``image_format`` png|jpeg;
    ``aligned`` photos are face crops already (no detection, centre square resized).
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

    size: int = field(default=112, metadata={"help": "stored aligned crop, in pixels (112 for real models; 32 or "
                                                      "64 for CPU work)", "flags": ("--crop-size", "--size")})
    image_format: str = field(default="png", metadata={"help": "crop encoding", "choices": FORMATS,
                                                        "flags": ("--format",)})
    jpeg_quality: int = field(default=95, metadata={"help": "JPEG quality of the stored crops (--format jpeg)"})
    select: str = field(default="largest", metadata={"help": "which face of a photo to keep: the largest box, the "
                                                              "most central big box, or the best score",
                                                      "choices": SELECTIONS})
    aligned: bool = field(default=False, metadata={
        "help": "the photos already are aligned face crops: no detection, each is resized (keeping its aspect, "
                "centre-cropped) to the crop size"})
    keep_all: bool = field(default=False, metadata={"help": "keep every face of a photo (galleries of group "
                                                             "photos)"})
    min_score: float = field(default=0.9, metadata={"help": "ignore detections below this score"})
    min_face_size: int = field(default=20, metadata={"help": "smallest face the detector looks for, in detector "
                                                              "pixels"})
    thresholds: tuple[float, float, float] = field(default=(0.6, 0.7, 0.7), metadata={
        "help": "MTCNN's three stage thresholds (P-, R-, O-net)"})
    detect_max_side: int = field(default=1280, metadata={"help": "photos are shrunk to this longest side for "
                                                                  "detection"})
    max_pixels: int = field(default=120_000_000, metadata={"help": "photos with more pixels are rejected "
                                                                    "unread"})
    max_bytes: int = field(default=64 * 1024 * 1024, metadata={"help": "photo files larger than this (bytes) are "
                                                                        "rejected unread"})
    protocol: str = field(default="single", metadata={
        "help": "single: each identity's photos split into query and database; cross: whole identities held out "
                "as unseen", "choices": PROTOCOLS})
    query_fraction: float = field(default=0.2, metadata={"help": "single: fraction of each identity's photos "
                                                                  "that are queries"})
    unseen_fraction: float = field(default=0.2, metadata={"help": "cross: fraction of identities held out as "
                                                                   "unseen"})
    min_photos: int = field(default=1, metadata={"help": "identities with fewer distinct photos are rejected "
                                                          "before detection"})
    seed: int = field(default=0, metadata={"help": "random seed of the splits"})
    shard_size: int = field(default=500, metadata={"help": "photos per output shard (the unit of resume)"})
    batch_size: int = field(default=16, metadata={"help": "photos per detector call"})
    commit_seconds: float = field(default=10.0, metadata={
        "help": "finished shards are listed in the manifest together at most this often (seconds); 0 commits each "
                "as soon as it is written; longer: fewer manifest rewrites, more redone after a crash"})
    num_workers: int | None = field(default=None, metadata={"help": "shards processed at once (default: one per "
                                                                     "CPU)", "type": int,
                                                             "flags": ("--shard-workers",)})
    torch_threads: int = field(default=1, metadata={"help": "torch threads of each shard task's detector"})
    executor: str = field(default="ray", metadata={"help": "ray (in-process, or the cluster of RAY_ADDRESS) or "
                                                            "local (every shard in this process, no Ray)",
                                                    "choices": EXECUTORS})
    lease_seconds: float = field(default=120.0, metadata={
        "help": "the run holds the dataset's writer lease (one writer per dataset), renewed every third of this; "
                "a killed run's lease is taken over after this many seconds (at once on the same host)"})
    storage_options: dict = field(default_factory=dict, compare=False,
                                  metadata={"help": "object-store options (Python API only)"})

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
        keys = ("size", "image_format", "jpeg_quality", "aligned", "select", "keep_all", "min_score", "min_face_size",
                "thresholds", "detect_max_side", "protocol", "query_fraction", "unseen_fraction",
                "min_photos", "seed")
        d = dataclasses.asdict(self)
        return {k: (list(d[k]) if isinstance(d[k], tuple) else d[k]) for k in keys}
