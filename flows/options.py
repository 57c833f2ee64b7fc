"""Typed ``options`` for the flows: each stage's config dataclass as a pydantic model.

A flow's ``options`` parameter is annotated with ``options_model(Config)``, so Prefect's UI
and ``prefect deployment run --param options='{...}'`` show and validate every setting with
its type, default and description (the same description ``opqn --help`` shows), and refuse
unknown names before the run starts. ``config_with_options`` turns the options (a model, or a
plain dict when a flow function is called directly) into the stage's config.
"""
from __future__ import annotations

import typing
from dataclasses import fields

import pydantic

from pipelines.config_flags import field_default

def options_model(cls, exclude: tuple = ()) -> type[pydantic.BaseModel]:
    """A pydantic model with ``cls``'s fields (minus ``exclude``: what the flow takes as its own
    parameters or sets itself), their defaults and their help texts; unknown names are errors."""
    hints = typing.get_type_hints(cls)
    spec = {f.name: (hints[f.name], pydantic.Field(default=field_default(f), description=f.metadata.get("help")))
            for f in fields(cls) if f.name not in exclude}
    return pydantic.create_model(f"{cls.__name__}Options", __config__=pydantic.ConfigDict(extra="forbid"), **spec)


def config_with_options(cls, what: str, fixed: dict, options, hidden: tuple = ()):
    """``cls(**fixed, **options)``, refusing option names ``cls`` does not take (or that are
    set by the flow's own parameters, or ``hidden``) with an error that lists the valid ones."""
    given = options.model_dump(exclude_unset=True) if isinstance(options, pydantic.BaseModel) else dict(options or {})
    known = {f.name for f in fields(cls)} - set(fixed) - set(hidden)
    unknown = sorted(set(given) - known)
    if unknown:
        raise ValueError(f"unknown {what} options {unknown}; valid: {sorted(known)}")
    hints = typing.get_type_hints(cls)
    for name, value in given.items():  # JSON has no tuples
        if isinstance(value, list) and typing.get_origin(hints[name]) is tuple:
            given[name] = tuple(value)
    return cls(**fixed, **given)
