"""LFW retrieval quality of the CPU configuration at 16 / 32 / 48 bit.

Protocol (single-domain, as in the paper's small-dataset experiments): LFW identities with
>= 10 photos; 20% of each identity's photos are queries, the rest are both the training set
and the retrieval database. For each code length one model is trained and we print the
quantized mAP (codes + query tables), P@5, and the float-feature mAP of the same model.
The last line is one JSON object keyed by bits.

    .venv/bin/python benchmarks/lfw_quality.py [--epochs 30] [--width 0.25]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import fields, replace

from pipelines.train.local import TrainConfig, prepare_sets, train_local

# bits -> (K, D): 2x256 / 4x256 / 6x256 with square codebooks (D = M*K).
CONFIGS = {16: (256, 0), 32: (256, 0), 48: (256, 0)}


def parse_settings(cls, pairs: list[str]) -> dict:
    """``FIELD=VALUE`` strings -> typed overrides of the dataclass ``cls``."""
    types = {f.name: type(f.default) for f in fields(cls)}
    out = {}
    for pair in pairs:
        name, _, value = pair.partition("=")
        if name not in types:
            raise SystemExit(f"--set {pair}: {cls.__name__} has no field {name!r}")
        kind = types[name]
        out[name] = value.lower() in ("1", "true", "yes") if kind is bool else kind(value)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="")
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--width", type=float, default=0.25)
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--bits", default="16,32,48")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                    help="any other training setting (repeatable), e.g. --set schedule=step --set batch_size=256")
    args = ap.parse_args(argv)
    base = TrainConfig(data=args.data, epochs=args.epochs, width=args.width, image_size=args.image_size,
                       threads=args.threads, min_photos=10, query_fraction=0.2, resume=False)
    base = replace(base, **parse_settings(TrainConfig, args.set))
    train_set, query_set = prepare_sets(base)
    print(f"LFW >= 10 photos: {len(train_set)} database/training faces, {len(query_set)} queries, "
          f"{len(set(train_set.labels))} identities", file=sys.stderr)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for bits in (int(b) for b in args.bits.split(",")):
            K, D = CONFIGS.get(bits, (256, 0))
            cfg = replace(base, bits=bits, codewords=K, dim=D, model_url=f"{tmp}/{bits}.pt")
            t0 = time.monotonic()
            out = train_local(cfg, train_set, query_set)
            m = out["metrics"]
            results[str(bits)] = {"map": round(m["map"], 4), "p5": round(m["p5"], 4),
                                  "map_float": round(m["map_float"], 4)}
            print(f"{bits} bit: mAP {m['map']:.4f} P@5 {m['p5']:.4f} float mAP {m['map_float']:.4f} "
                  f"({time.monotonic() - t0:.0f} s)", flush=True)
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
