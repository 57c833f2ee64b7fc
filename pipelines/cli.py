"""The `opqn` console command: one entry point, one subcommand per pipeline stage.

Each stage module exposes ``register(subparsers)``, which adds its subcommand and sets
``func`` to a function taking the parsed arguments; the stage logic itself lives in plain
functions so the Python API mirrors the CLI.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import re
import sys
import traceback

from pipelines.config_flags import explain_defaults
from storage.errors import (CommitConflictError, StorageAuthError, StorageError,
                            StorageUnavailableError)

# Stage modules, in pipeline order. Adding a stage is one line here.
STAGES = [
    "pipelines.ingest.cli",
    "pipelines.train.cli",
    "pipelines.query.cli",
    "pipelines.encode.cli",
    "pipelines.evaluate.cli",
    "pipelines.view.cli",
    "pipelines.main_job.cli",
    "infra.stack",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="opqn",
        description="Face image retrieval with OPQN: prepare, train, encode, query, evaluate.",
        epilog="Every command takes --json (its summary as one JSON object) and --verbose (anywhere on "
               "the line). Errors a user can fix end in one line `opqn COMMAND: error: ...` and exit 1.",
    )
    parser.add_argument("--verbose", action="store_true",
                        help="show tracebacks with errors, info logs and the engines' (Ray's) own output; "
                             "accepted anywhere on the command line (default: off)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in STAGES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name and name.startswith(exc.name):
                continue  # stage not built yet
            raise
        module.register(sub)
    explain_defaults(parser)
    return parser


# Fixes named after errors whose own message may not say what to do.
_FIXES = [
    (CommitConflictError, "another writer kept committing to the same manifest; run again when it is done"),
    (StorageUnavailableError, "check AWS_ENDPOINT_URL and that the object store is up"),
    (StorageAuthError, "check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY"),
    (FileNotFoundError, "check the path or URL"),
    (PermissionError, "check the permissions of the path, or the object store's credentials"),
    (FileExistsError, "remove it or choose another path"),
    (ConnectionError, "check the address and that the service is up"),
    (TimeoutError, "check the address and that the service is up"),
]


# words of a message that already names its fix
_HINTS = re.compile(r"\b(check|set|pass|run|use|give|remove|choose|lower|raise)\b|`opqn ")


def _cause(exc: BaseException) -> BaseException:
    """The user's exception inside the engines' wrappers: a Ray task error (``cause``), a Ray
    Train run that failed on its workers (``worker_failures``, the lowest rank's) or its
    controller (``controller_failure``), a worker's exception with its traceback (``_base_exc``)."""
    for _ in range(10):
        failures = getattr(exc, "worker_failures", None)
        if isinstance(failures, dict) and failures:
            inner = failures[min(failures)]
        else:
            inner = next((getattr(exc, a) for a in ("controller_failure", "_base_exc", "cause")
                          if isinstance(getattr(exc, a, None), BaseException)), None)
        if inner is None or inner is exc:
            break
        exc = inner
    return exc


def _is_engine_connection_error(exc: BaseException) -> bool:
    """botocore / urllib3 connection failures that reached us untranslated (they name the endpoint)."""
    names = {c.__name__ for c in type(exc).__mro__}
    return bool(names & {"EndpointConnectionError", "ConnectTimeoutError", "ConnectionClosedError",
                         "NewConnectionError", "MaxRetryError", "NoCredentialsError"})


def user_error(exc: BaseException) -> str | None:
    """One line for an error the user can fix (bad path or URL, unreachable or refusing store,
    conflicting writer, wrong settings), or None for a bug (shown with its traceback)."""
    exc = _cause(exc)
    if not isinstance(exc, (ValueError, OSError, ConnectionError, TimeoutError)) \
            and not _is_engine_connection_error(exc):
        return None
    text = " ".join(str(exc).split()) or type(exc).__name__
    if isinstance(exc, OSError) and not isinstance(exc, StorageError) and exc.filename and exc.strerror:
        text = f"{exc.strerror}: {exc.filename}"  # not "[Errno 2] ..."
    if _is_engine_connection_error(exc):
        return f"{text}; check AWS_ENDPOINT_URL / the service address, the credentials, and that it is up"
    # raw OS errors ("Permission denied: x"), bare storage errors and "not found" messages that
    # name no fix get the usual one; other errors of ours say what to do
    named = bool(_HINTS.search(text))
    if not named and (isinstance(exc, (StorageError, FileNotFoundError)) or getattr(exc, "errno", None) is not None):
        for kind, fix in _FIXES:
            if isinstance(exc, kind):
                return f"{text}; {fix}"
    return text


def _pop_verbose(argv: list[str]) -> tuple[list[str], bool]:
    """``--verbose`` is global but accepted after the subcommand too, where users type it."""
    return [a for a in argv if a != "--verbose"], "--verbose" in argv


def main(argv: list[str] | None = None) -> int:
    argv, verbose = _pop_verbose(list(sys.argv[1:] if argv is None else argv))
    if verbose:  # before the stage modules are imported: execution quiets Ray at import unless set
        os.environ["OPQN_VERBOSE"] = "1"
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    command = " ".join(filter(None, (args.command, getattr(args, "gallery_command", None))))
    try:
        result = args.func(args)
    except KeyboardInterrupt:
        print(f"opqn {command}: interrupted; running it again resumes where it stopped", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - user errors become one line, bugs are re-raised
        message = user_error(exc)
        if message is None:
            raise
        if verbose:
            traceback.print_exc()
        print(f"opqn {command}: error: {message}", file=sys.stderr)
        return 1
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
