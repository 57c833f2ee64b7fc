"""Command-line flags from a config dataclass: one ``--flag`` per field, and the config back.

Every stage's config is a dataclass; its CLI module adds the flags with
``add_config_arguments`` and rebuilds the config with ``config_from_args``, so a new field
is a new flag without touching the parser.
"""
from __future__ import annotations

import argparse
from dataclasses import MISSING, fields


def add_config_arguments(parser: argparse.ArgumentParser, cls, skip=()) -> None:
    """One ``--flag`` per dataclass field (booleans become --flag / --no-flag)."""
    for f in fields(cls):
        if f.name in skip:
            continue
        default = f.default if f.default is not MISSING else f.default_factory()
        flag = "--" + f.name.replace("_", "-")
        if isinstance(default, bool):
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=default)
        elif isinstance(default, tuple):
            parser.add_argument(flag, dest=f.name, default=default, type=lambda s: tuple(x for x in s.split(",") if x),
                                help=f"comma-separated (default: {','.join(default)})")
        else:
            parser.add_argument(flag, dest=f.name, type=type(default), default=default, help=f"(default: {default!r})")


def config_from_args(cls, args, **extra):
    return cls(**{f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)}, **extra)
