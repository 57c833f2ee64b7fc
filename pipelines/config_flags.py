"""Command-line flags from a config dataclass: one ``--flag`` per field, and the config back.

Every stage's config is a dataclass; its CLI module adds the flags with
``add_config_arguments`` and rebuilds the config with ``config_from_args``, so a new field
is a new flag without touching the parser. A field explains itself once, in its declaration:
``field(default=..., metadata={"help": "..."})``; the flag's help is that text plus the
default, so the CLI, the Prefect flows and the code read the same description. Optional
metadata: ``choices`` (allowed values), ``flags`` (the option strings when they differ from
``--field-name``, e.g. a short established name), ``type`` (for a field whose default is None).
"""
from __future__ import annotations

import argparse
from dataclasses import MISSING, fields


def field_default(f):
    """A dataclass field's default value (``default`` or ``default_factory()``)."""
    return f.default if f.default is not MISSING else f.default_factory()


def format_default(value) -> str:
    """A default as a user would type it (tuples comma-separated, booleans as on/off)."""
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, (tuple, list)):
        return ",".join(str(v) for v in value) or '""'
    if value == "":
        return '""'
    return str(value)


def with_default(text: str, default) -> str:
    """``text`` followed by its default, escaped for argparse's %-formatting (a text that says
    its default in words, e.g. for a None default, keeps it)."""
    if "(default:" not in text:
        text = f"{text} (default: {format_default(default)})"
    return text.replace("%", "%%")


def _tuple_of(kind):
    return lambda s: tuple(kind(x) for x in s.split(",") if x)


def add_config_arguments(parser: argparse.ArgumentParser, cls, skip=()) -> None:
    """One ``--flag`` per dataclass field (booleans become --flag / --no-flag), help from its metadata.

    Fields whose values a command line cannot carry (dicts) are left out.
    """
    for f in fields(cls):
        if f.name in skip:
            continue
        default = field_default(f)
        if isinstance(default, dict):
            continue
        meta = f.metadata
        flags = meta.get("flags") or ("--" + f.name.replace("_", "-"),)
        metavar = flags[0].lstrip("-").replace("-", "_").upper()
        text = meta.get("help", "")
        if isinstance(default, bool):
            action = parser.add_argument(*flags, dest=f.name, action=argparse.BooleanOptionalAction, default=default)
            # set after construction: BooleanOptionalAction would append its own "(default: ...)"
            action.help = with_default(text, default)
            continue
        if isinstance(default, tuple):
            kind = type(default[0]) if default else str
            parser.add_argument(*flags, dest=f.name, default=default, type=_tuple_of(kind), metavar=metavar,
                                help=with_default(f"{text}; comma-separated" if text else "comma-separated", default))
            continue
        kind = meta.get("type") or type(default)
        parser.add_argument(*flags, dest=f.name, type=kind, default=default, choices=meta.get("choices"),
                            metavar=None if meta.get("choices") else metavar,
                            help=with_default(text, default))


def explain_defaults(parser: argparse.ArgumentParser) -> None:
    """Append ``(default: ...)`` to every option of ``parser`` and its subcommands whose help lacks one.

    Hand-written options that say their default in words (``default: the training run's``)
    keep their wording; the rest show the value argparse will use.
    """
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                explain_defaults(sub)
            continue
        if not action.option_strings or action.help in (None, argparse.SUPPRESS) or action.required:
            continue
        if isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
            continue
        if "default" not in action.help.lower():
            default = action.default
            shown = "none" if default is None else format_default(default)
            action.help += f" (default: {shown})".replace("%", "%%")


def add_json_flag(parser: argparse.ArgumentParser) -> None:
    """``--json``: the command's summary as one JSON object on stdout (every command has it)."""
    parser.add_argument("--json", action="store_true",
                        help="print the command's summary as one JSON object on stdout (default: off, a "
                             "human-readable summary)")


def config_from_args(cls, args, **extra):
    return cls(**{f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)}, **extra)
