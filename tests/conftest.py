# --- shared data fixtures (lead) -------------------------------------------------------
import os

import pytest

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def _require_dir(path):
    """Tests on real photos need the shared data; in CI its absence is a failure, not a skip."""
    if not path.is_dir():
        message = f"{path} not found: set OPQN_DATA to the folder holding lfw/, att_faces/, photos/"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


@pytest.fixture(scope="session")
def data_root():
    from pipelines.settings import data_root as root
    return _require_dir(root())


@pytest.fixture(scope="session")
def lfw_dir(data_root):
    return _require_dir(data_root / "lfw")
# --- end shared data fixtures ----------------------------------------------------------
