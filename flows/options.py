"""The one check every flow applies to its ``options`` parameter before anything starts."""
from __future__ import annotations

from dataclasses import fields


def config_with_options(cls, what: str, fixed: dict, options: dict | None, hidden: tuple = ()):
    """``cls(**fixed, **options)``, refusing option names ``cls`` does not take (or that are
    set by the flow's own parameters, or ``hidden``) with an error that lists the valid ones."""
    known = {f.name for f in fields(cls)} - set(fixed) - set(hidden)
    unknown = sorted(set(options or {}) - known)
    if unknown:
        raise ValueError(f"unknown {what} options {unknown}; valid: {sorted(known)}")
    return cls(**fixed, **(options or {}))
