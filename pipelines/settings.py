"""Where the data lives: one setting for tests, benchmarks and the main command.

``OPQN_DATA`` names a folder holding ``lfw/``, ``att_faces/``, ``photos/`` (or any subset);
without it, ``../shared/data`` beside the repository is used when it exists.
"""
from __future__ import annotations

import os
from pathlib import Path

REPO_DIR = Path(__file__).resolve().parent.parent


def data_root() -> Path:
    env = os.environ.get("OPQN_DATA")
    if env:
        return Path(env).expanduser().resolve()
    for candidate in (REPO_DIR.parent / "shared" / "data", Path.cwd().parent / "shared" / "data"):
        if candidate.is_dir():
            return candidate.resolve()
    return (REPO_DIR.parent / "shared" / "data").resolve()


def dataset_dir(name: str) -> Path:
    """A named data set under the data root, with an error that says how to point at one."""
    path = data_root() / name
    if not path.is_dir():
        raise FileNotFoundError(
            f"data set {name!r} not found at {path}; set OPQN_DATA to a folder containing {name}/ "
            f"or pass the image folder explicitly"
        )
    return path
