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


# --- S3 fixtures (storage) -------------------------------------------------------------
# A real SeaweedFS server on a free 127.0.0.1 port for the whole session, torn down after.
# `s3_server` yields the infra.s3_server.S3Server handle (.endpoint, .pid, .env(),
# .storage_options()) and points the environment at it, so plain `s3://...` URLs work in
# this process and in any child process (Ray workers, subprocesses) started afterwards.
# `s3_bucket` yields a fresh empty bucket URL ("s3://t-<hex>") per test.
_S3_TEST_ENV = {
    # bounded retries: an unreachable endpoint fails in about a second, not after minutes
    "AWS_MAX_ATTEMPTS": "2",
    "AWS_RETRY_MODE": "standard",
}


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    from infra.s3_server import start_s3_server, weed_binary

    try:
        weed_binary()
    except FileNotFoundError as exc:
        if os.environ.get("CI"):
            pytest.fail(str(exc))
        pytest.skip(str(exc))
    server = start_s3_server(tmp_path_factory.mktemp("s3-server"))
    env = {**server.env(), **_S3_TEST_ENV}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield server
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        server.stop()


@pytest.fixture
def s3_bucket(s3_server):
    import uuid

    from storage import urls

    url = f"s3://t-{uuid.uuid4().hex[:16]}"
    fs, path = urls.resolve(url)
    fs.mkdir(path)
    return url
# --- end S3 fixtures (storage) ---------------------------------------------------------


# --- Ray fixtures ----------------------------------------------------------------------
# Starting Ray costs seconds: one in-process Ray and one two-node cluster serve every test
# module that needs one. Modules use them, never start or stop Ray themselves.
@pytest.fixture(scope="session")
def ray_local(s3_server):
    """In-process Ray for the stage functions (what `start_ray` starts without RAY_ADDRESS),
    started after the S3 server so its workers see the S3 endpoint."""
    import ray

    from pipelines.execution import start_ray

    ray.shutdown()
    start_ray(num_cpus=2)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def ray_cluster(s3_server):
    """A real two-node Ray cluster on 127.0.0.1 (head + one extra node, 2 CPUs each); yields
    its address for RAY_ADDRESS. Started after the S3 server, so its workers see the S3 endpoint;
    CLI runs in a subprocess join it rather than start a Ray of their own (seconds each)."""
    from infra.ray_local import start, stop_pid

    proc, address = start(nodes=2, cpus_per_node=2)
    yield address
    stop_pid(proc.pid)
# --- end Ray fixtures ------------------------------------------------------------------


def pytest_configure(config):
    # a test that starts its own Ray head node (tests/test_ray_jobs.py): `-m "not slow"` skips it
    config.addinivalue_line("markers", "slow: starts its own Ray head node; deselect with -m 'not slow'")
