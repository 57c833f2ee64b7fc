"""storage/ and infra/s3_server.py against local disk and a real SeaweedFS S3 server.

The `root` fixture runs each storage case twice: on a local directory and on a fresh
bucket of the session's S3 server (tests/conftest.py). Fault cases (killed writers,
stopped server, wrong keys, corrupt manifests) use real processes and real servers.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pyarrow as pa
import pytest

from storage import checkpoints, files, urls
from storage.errors import (
    IntegrityError, ManifestError, StorageAuthError, StorageError, StorageNotFoundError,
    StorageUnavailableError, UnsafePathError,
)
from storage.manifest import (
    Delta, FileEntry, Manifest, commit, file_url, iter_manifest_batches, manifest_url,
    orphans, read_manifest, verify, write_data_file,
)
from storage.tables import iter_batches, read_schema, read_table, write_table

REPO = Path(__file__).resolve().parents[1]

SCHEMA = pa.schema([
    ("face_id", pa.string()),
    ("image", pa.binary()),
    ("box", pa.list_(pa.float32(), 4)),
    ("score", pa.float32()),
])


def make_batch(start: int, n: int, payload: int = 16) -> pa.RecordBatch:
    ids = [f"f{start + i:07d}" for i in range(n)]
    return pa.record_batch([
        pa.array(ids),
        pa.array([os.urandom(payload) for _ in range(n)], pa.binary()),
        pa.array([[float(i), 0.0, 1.0, 2.0] for i in range(n)], pa.list_(pa.float32(), 4)),
        pa.array([float(start + i) for i in range(n)], pa.float32()),
    ], schema=SCHEMA)


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "dataset")
    return request.getfixturevalue("s3_bucket") + "/dataset"


def run_python(code: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter with this process's env (S3 vars included)."""
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


# --------------------------------------------------------------------------- urls

def test_storage_never_imports_torch():
    out = run_python("""
        import sys
        import storage, storage.urls, storage.files, storage.tables, storage.manifest
        import storage.checkpoints, storage.errors
        print("torch" in sys.modules)
    """)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_url_helpers(monkeypatch, tmp_path):
    assert urls.is_local("/a/b") and urls.is_local("rel/x") and urls.is_local("file:///a")
    assert not urls.is_local("s3://bucket/x")
    assert urls.join("s3://bucket", "a", "/b/") == "s3://bucket/a/b"
    assert urls.join("s3://bucket/p/", "x.json") == "s3://bucket/p/x.json"
    assert urls.join("/data", "/etc") == "/data/etc"  # never escapes to an absolute part
    assert urls.join("/", "x") == "/x"
    fs, path = urls.resolve(f"file://{tmp_path}/x")
    assert path == f"{tmp_path}/x" and "file" in fs.protocol
    monkeypatch.chdir(tmp_path)
    assert urls.resolve("rel/x")[1] == f"{tmp_path}/rel/x"

    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-3")
    opts = urls.s3_options()
    assert opts == {"client_kwargs": {"endpoint_url": "http://127.0.0.1:9", "region_name": "eu-west-3"}}
    opts = urls.s3_options({"client_kwargs": {"endpoint_url": "http://other:1"}, "anon": True})
    assert opts["client_kwargs"]["endpoint_url"] == "http://other:1"
    assert opts["client_kwargs"]["region_name"] == "eu-west-3" and opts["anon"] is True
    fs, path = urls.resolve("s3://bucket/key")
    assert path == "bucket/key"
    # changing credentials in the environment must not reuse a client built with old ones
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "someone-else")
    assert urls.resolve("s3://bucket/key")[0] is not fs


# --------------------------------------------------------------------------- tables

def test_table_round_trip_streamed(root):
    url = urls.join(root, "faces/part-0.parquet")
    produced = []

    def batches():  # a generator: the writer must consume it lazily, batch by batch
        for i in range(5):
            b = make_batch(i * 1000, 1000)
            produced.append(b)
            yield b

    written = write_table(url, batches())
    assert written.rows == 5000
    assert (written.size, written.sha256) == files.stat(url)
    assert read_schema(url).equals(SCHEMA)

    import pyarrow.parquet as pq
    fs, path = urls.resolve(url)
    with fs.open(path, "rb") as f:
        assert pq.ParquetFile(f).num_row_groups == 5  # one row group per batch: streamed

    got = list(iter_batches(url, batch_size=700))
    assert all(b.num_rows <= 700 for b in got) and len(got) >= 8
    assert pa.Table.from_batches(got).equals(pa.Table.from_batches(produced))
    ids = read_table(url, columns=["face_id"])
    assert ids.column_names == ["face_id"] and ids.num_rows == 5000
    assert ids.column(0)[4999].as_py() == "f0004999"


def test_table_write_is_all_or_nothing(root):
    url = urls.join(root, "t.parquet")
    write_table(url, make_batch(0, 10))
    before = files.read_all(url)

    def failing():
        yield make_batch(100, 10)
        raise RuntimeError("source broke")

    with pytest.raises(RuntimeError, match="source broke"):
        write_table(url, failing())
    assert files.read_all(url) == before  # old file intact, not half-replaced
    with pytest.raises(RuntimeError):
        write_table(urls.join(root, "new.parquet"), failing())
    assert not files.exists(urls.join(root, "new.parquet"))
    if urls.is_local(root):
        assert sorted(os.listdir(urls.local_path(root))) == ["t.parquet"]  # no temp files
    with pytest.raises(FileExistsError):
        write_table(url, make_batch(0, 1), exclusive=True)
    with pytest.raises(ValueError, match="no batches and no schema"):
        write_table(urls.join(root, "empty.parquet"), iter([]))
    empty = write_table(urls.join(root, "empty.parquet"), iter([]), schema=SCHEMA)
    assert empty.rows == 0 and read_table(empty.url).schema.equals(SCHEMA)


def test_checkpoint_round_trip(root):
    url = urls.join(root, "ckpt/model.pt")
    assert not checkpoints.exists(url)
    with pytest.raises(StorageNotFoundError, match="model.pt") as info:
        checkpoints.read_bytes(url)
    assert isinstance(info.value, FileNotFoundError)  # callers may catch the builtin
    blob = os.urandom(300_000)
    checkpoints.write_bytes(url, blob)
    assert checkpoints.exists(url) and checkpoints.read_bytes(url) == blob
    checkpoints.write_bytes(url, b"v2")
    assert checkpoints.read_bytes(url) == b"v2"


# --------------------------------------------------------------------------- manifests

def test_manifest_commit_read_verify(root):
    assert read_manifest(root) is None  # documented: None when never committed
    a = write_data_file(root, make_batch(0, 100), subdir="codes")
    b = write_data_file(root, [make_batch(100, 50), make_batch(150, 50)], subdir="codes")
    assert a.path.startswith("codes/part-") and a.path != b.path
    assert (a.rows, b.rows) == (100, 100)

    m1 = commit(root, Delta(add=(a,), metadata={"model_id": "m1", "M": 8}))
    m2 = commit(root, Delta(add=(a, b), metadata={"K": 256}))  # re-adding a: no duplicate
    assert (m1.generation, m2.generation) == (1, 2)
    got = read_manifest(root)
    assert got == m2
    assert got.paths == [a.path, b.path] and got.rows == 200
    assert got.metadata == {"model_id": "m1", "M": 8, "K": 256}
    assert verify(root) == got
    doc = json.loads(files.read_all(manifest_url(root)))
    assert doc["format"] == "opqn-manifest" and doc["version"] == 1
    assert doc["files"][0] == {"path": a.path, "rows": 100, "size": a.size, "sha256": a.sha256}

    rows = sum(batch.num_rows for batch in iter_manifest_batches(root, columns=["face_id"]))
    assert rows == 200

    def drop_a_and_mark(m: Manifest) -> Manifest:
        return Delta(remove=(a.path,), metadata={"deleted": ["f0000001"]}, drop_metadata=("M",)).apply(m)

    m3 = commit(root, drop_a_and_mark)
    assert m3.paths == [b.path] and m3.generation == 3
    assert read_manifest(root).metadata == {"model_id": "m1", "K": 256, "deleted": ["f0000001"]}
    assert orphans(root) == [a.path]  # unlisted, not deleted: old readers may need it

    with pytest.raises(ManifestError, match="different size/checksum"):
        commit(root, Delta(add=(FileEntry(b.path, 1, b.size, "0" * 64),)))
    with pytest.raises(IntegrityError, match="does not exist"):
        commit(root, Delta(add=(FileEntry("codes/never-written.parquet", 1, 10, "0" * 64),)))
    assert read_manifest(root) == m3


WRITER_KILLED_IN_COMMIT = """
    import os, signal, sys
    import pyarrow as pa
    from storage.manifest import Delta, commit, write_data_file
    root = {root!r}
    batch = pa.record_batch([pa.array(["x"] * 10)], names=["face_id"])
    entries = [write_data_file(root, batch, subdir="codes") for _ in range(2)]
    print("written", *[e.path for e in entries], flush=True)

    def die_before_manifest(m):  # runs after the data files, before the manifest PUT
        os.kill(os.getpid(), signal.SIGKILL)

    commit(root, die_before_manifest)
"""


def test_killed_writer_leaves_old_manifest(root):
    base = write_data_file(root, make_batch(0, 10), subdir="codes")
    old = commit(root, Delta(add=(base,), metadata={"watermark": 1}))
    old_bytes = files.read_all(manifest_url(root))

    out = run_python(WRITER_KILLED_IN_COMMIT.format(root=root))
    assert out.returncode == -signal.SIGKILL, out.stderr
    new_paths = out.stdout.split()[1:]
    assert len(new_paths) == 2

    assert files.read_all(manifest_url(root)) == old_bytes  # byte for byte the old one
    assert verify(root) == old  # and it is complete: every listed file is intact
    assert orphans(root) == sorted(new_paths)  # the dead writer's files are not listed
    # a re-run commits normally afterwards
    again = write_data_file(root, make_batch(10, 10), subdir="codes")
    assert commit(root, Delta(add=(again,))).paths == [base.path, again.path]


def test_killed_lock_holder_does_not_wedge_local_manifest(tmp_path):
    root = str(tmp_path / "ds")
    commit(root, Delta(metadata={"v": 1}))
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import fcntl, os, time
        fd = os.open({root + '/.manifest.lock'!r}, os.O_RDWR)
        fcntl.flock(fd, fcntl.LOCK_EX)
        print("locked", flush=True)
        time.sleep(60)
    """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        blocked = threading.Thread(target=commit, args=(root, Delta(metadata={"v": 2})))
        blocked.start()
        blocked.join(0.5)
        assert blocked.is_alive()  # the lock really excludes other committers
        holder.kill()  # the kernel releases a dead process's flock
        blocked.join(10)
        assert not blocked.is_alive()
    finally:
        holder.kill()
        holder.wait()
    assert read_manifest(root).metadata == {"v": 2}


def test_concurrent_committers_threads(root):
    n_threads, per_thread = 4, 3
    entries = [[write_data_file(root, make_batch(t * 100 + i, 5), subdir="codes")
                for i in range(per_thread)] for t in range(n_threads)]
    calls = []
    barrier = threading.Barrier(n_threads)
    errors = []

    def worker(mine):
        try:
            barrier.wait()
            for entry in mine:
                def change(m, entry=entry):
                    calls.append(entry.path)
                    time.sleep(0.02)  # widen the read-modify-write window
                    return Delta(add=(entry,)).apply(m)
                commit(root, change)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the main thread
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(e,)) for e in entries]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    final = verify(root)
    expected = {e.path for mine in entries for e in mine}
    assert set(final.paths) == expected and len(final.paths) == len(expected)
    assert final.generation == n_threads * per_thread
    assert len(calls) > n_threads * per_thread  # races happened and were retried


CONCURRENT_WRITER = """
    import sys
    import pyarrow as pa
    from storage.manifest import Delta, commit, write_data_file
    root, tag = sys.argv[1], sys.argv[2]
    for i in range(4):
        batch = pa.record_batch([pa.array([f"{tag}-{i}"])], names=["face_id"])
        entry = write_data_file(root, batch, subdir="codes", prefix=tag)
        commit(root, Delta(add=(entry,), metadata={tag: i}))
"""


def test_concurrent_committers_processes(root):
    procs = [subprocess.Popen([sys.executable, "-c", textwrap.dedent(CONCURRENT_WRITER), root, tag],
                              cwd=REPO, stderr=subprocess.PIPE, text=True) for tag in ("wa", "wb")]
    for p in procs:
        _, err = p.communicate(timeout=90)
        assert p.returncode == 0, err
    final = verify(root)
    assert len(final.paths) == 8
    assert sorted(p.split("/")[1][:2] for p in final.paths) == ["wa"] * 4 + ["wb"] * 4
    assert final.metadata == {"wa": 3, "wb": 3} and final.generation == 8
    ids = {b.column(0)[0].as_py() for b in iter_manifest_batches(root)}
    assert ids == {f"{t}-{i}" for t in ("wa", "wb") for i in range(4)}


BAD_PATHS = ["../outside.parquet", "codes/../../outside.parquet", "/etc/passwd",
             "s3://other-bucket/x.parquet", "file:///etc/passwd", "C:/x.parquet",
             "~/x.parquet", "codes//x.parquet", "./x.parquet", "codes\\..\\x.parquet", ""]


def test_escaping_paths_rejected(root):
    good = write_data_file(root, make_batch(0, 3))
    commit(root, Delta(add=(good,)))
    murl = manifest_url(root)
    valid = json.loads(files.read_all(murl))
    for bad in BAD_PATHS:
        doc = json.loads(json.dumps(valid))
        doc["files"].append({"path": bad, "rows": 1, "size": 1, "sha256": "0" * 64})
        files.write_bytes_atomic(murl, json.dumps(doc).encode())
        with pytest.raises(UnsafePathError) as info:
            read_manifest(root)
        assert murl in str(info.value) and repr(bad) in str(info.value)
        assert info.value.path == bad and info.value.manifest == murl
        with pytest.raises(UnsafePathError):
            file_url(root, bad)
    # the commit API refuses them too, and leaves the manifest alone
    files.write_bytes_atomic(murl, json.dumps(valid).encode())
    for bad in ("../x.parquet", "s3://other-bucket/x"):
        with pytest.raises(UnsafePathError):
            commit(root, Delta(add=(FileEntry(bad, 1, 1, "0" * 64),)), check_added=False)
    assert read_manifest(root).paths == [good.path]


def test_malformed_manifest_is_an_error_and_not_overwritten(root):
    murl = manifest_url(root)
    entry = write_data_file(root, make_batch(0, 3))
    for broken in (b'{"format": "opqn-manifest", "files": [', b"[1, 2]", b"\xff\xfe",
                   b'{"version": 1, "files": [{"path": "a.parquet", "rows": -1, "size": 1, "sha256": "x"}]}'):
        files.write_bytes_atomic(murl, broken)
        for action in (lambda: read_manifest(root), lambda: verify(root),
                       lambda: commit(root, Delta(add=(entry,)))):
            with pytest.raises(ManifestError, match=murl.replace("\\", "\\\\")):
                action()
        assert files.read_all(murl) == broken  # nothing overwritten


def test_missing_listed_file_is_named(root):
    a = write_data_file(root, make_batch(0, 3))
    b = write_data_file(root, make_batch(3, 3))
    commit(root, Delta(add=(a, b)))
    before = files.read_all(manifest_url(root))
    files.delete(file_url(root, b))
    with pytest.raises(IntegrityError, match="missing") as info:
        verify(root)
    assert file_url(root, b) in str(info.value) and info.value.path == b.path
    assert a.path not in str(info.value)
    assert files.read_all(manifest_url(root)) == before


def test_checksum_and_size_mismatch_are_named(root):
    a = write_data_file(root, make_batch(0, 30))
    b = write_data_file(root, make_batch(30, 30))
    commit(root, Delta(add=(a, b)))
    before = files.read_all(manifest_url(root))
    data = bytearray(files.read_all(file_url(root, a)))
    data[len(data) // 2] ^= 0xFF  # same size, different bytes
    files.write_bytes_atomic(file_url(root, a), bytes(data))
    with pytest.raises(IntegrityError, match="sha256") as info:
        verify(root)
    assert file_url(root, a) in str(info.value) and info.value.path == a.path
    assert verify(root, checksums=False)  # sizes still agree
    files.write_bytes_atomic(file_url(root, b), b"short")
    with pytest.raises(IntegrityError, match="5 bytes") as info:
        verify(root, checksums=False)
    assert file_url(root, b) in str(info.value)
    assert files.read_all(manifest_url(root)) == before


# --------------------------------------------------------------------------- S3 faults

@pytest.fixture
def private_s3(tmp_path):
    """A dedicated server this test may kill and restart (the session one stays up)."""
    from infra.s3_server import start_s3_server

    server = start_s3_server(tmp_path / "s3")
    servers = [server]
    yield servers
    for s in servers:
        s.kill()


def test_s3_server_stopped_mid_write_then_retry(private_s3):
    from infra.s3_server import start_s3_server

    server = private_s3[0]
    opts = {**server.storage_options(), "config_kwargs": {"retries": {"max_attempts": 2, "mode": "standard"}}}
    urls.resolve("s3://mid-write", opts)[0].mkdir("mid-write")
    root = "s3://mid-write/gallery"
    first = write_data_file(root, make_batch(0, 10), storage_options=opts)
    committed = commit(root, Delta(add=(first,), metadata={"watermark": 1}), opts)

    def batches():  # ~9 MB of incompressible rows: a multipart upload is under way
        for i in range(3):
            if i == 2:
                server.kill()
            yield make_batch(i * 10, 10, payload=300_000)

    t0 = time.monotonic()
    with pytest.raises(StorageError) as info:
        write_data_file(root, batches(), storage_options=opts)
    assert time.monotonic() - t0 < 30
    assert "s3://mid-write/gallery/part-" in str(info.value)
    assert isinstance(info.value, StorageUnavailableError), repr(info.value)
    with pytest.raises(StorageUnavailableError, match="s3://mid-write/gallery/manifest.json"):
        commit(root, Delta(metadata={"watermark": 2}), opts)

    restarted = start_s3_server(server.data_dir, port=server.port)
    private_s3.append(restarted)
    assert restarted.endpoint == server.endpoint
    assert verify(root, opts) == committed  # nothing from the failed write was committed
    assert orphans(root, opts) == []  # and no partial object appeared
    again = write_data_file(root, (make_batch(i * 10, 10, payload=300_000) for i in range(3)),
                            storage_options=opts)
    final = commit(root, Delta(add=(again,), metadata={"watermark": 2}), opts)
    assert verify(root, opts) == final and final.paths == [first.path, again.path]


def test_s3_wrong_credentials_is_an_auth_error(s3_server, s3_bucket):
    good = s3_server.storage_options()
    url = urls.join(s3_bucket, "ckpt.pt")
    checkpoints.write_bytes(url, b"weights", good)
    for bad in ({**good, "secret": "not-the-secret-" + "x" * 20}, {**good, "key": "nobody"}):
        for action in (lambda: checkpoints.read_bytes(url, bad),
                       lambda: checkpoints.write_bytes(url, b"evil", bad),
                       lambda: read_manifest(s3_bucket, bad)):
            with pytest.raises(StorageAuthError) as info:
                action()
            message = str(info.value)
            assert s3_bucket in message and "credentials" in message
            assert bad["secret"] not in message and good["secret"] not in message
    assert checkpoints.read_bytes(url, good) == b"weights"


# --------------------------------------------------------------------------- infra CLI

def _listening_addresses(pid: int) -> set[str]:
    """Local addresses of the TCP sockets ``pid`` listens on (from /proc)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            cols = line.split()
            if cols[3] == "0A" and cols[9] in inodes:  # 0A = LISTEN
                found.add(cols[1].split(":")[0])
    return found


def _exited(pid: int) -> bool:
    """Gone, or a zombie waiting for init to reap it (the CLI's parent has exited)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def test_s3_server_cli_start_stop(tmp_path):
    pid_file = tmp_path / "weed.pid"
    out = subprocess.run([sys.executable, "-m", "infra.s3_server", "start", "--dir",
                          str(tmp_path / "s3"), "--pid-file", str(pid_file)],
                         cwd=REPO, capture_output=True, text=True, timeout=90)
    pid = int(pid_file.read_text()) if pid_file.exists() else None
    try:
        assert out.returncode == 0, out.stderr
        exports = dict(line[len("export "):].split("=", 1) for line in out.stdout.splitlines()
                       if line.startswith("export "))
        assert exports["AWS_ENDPOINT_URL"].startswith("http://127.0.0.1:")
        assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION"} <= exports.keys()
        addresses = _listening_addresses(pid)
        assert addresses and addresses == {"0100007F"}, addresses  # 127.0.0.1 only
        opts = {"key": exports["AWS_ACCESS_KEY_ID"], "secret": exports["AWS_SECRET_ACCESS_KEY"],
                "client_kwargs": {"endpoint_url": exports["AWS_ENDPOINT_URL"]}}
        urls.resolve("s3://cli-bucket", opts)[0].mkdir("cli-bucket")
        checkpoints.write_bytes("s3://cli-bucket/x", b"ok", opts)
        assert checkpoints.read_bytes("s3://cli-bucket/x", opts) == b"ok"
        stop = subprocess.run([sys.executable, "-m", "infra.s3_server", "stop", "--pid-file",
                               str(pid_file)], cwd=REPO, capture_output=True, text=True, timeout=60)
        assert stop.returncode == 0, stop.stderr
        assert _exited(pid) and not pid_file.exists()
    finally:
        if pid and Path(f"/proc/{pid}").exists():
            os.kill(pid, signal.SIGKILL)


def test_vacuum_deletes_only_old_unlisted_files_under_the_lease(root):
    import threading as _threading

    from storage import lease
    from storage.vacuum import vacuum

    listed = write_data_file(root, make_batch(0, 3))
    superseded = write_data_file(root, make_batch(3, 3))
    commit(root, Delta(add=(listed, superseded)))
    commit(root, Delta(remove=(superseded.path,)))  # e.g. a compaction unlisted it
    crashed = write_data_file(root, make_batch(6, 3))  # a crashed writer's file, never listed
    assert vacuum(root, older_than=3600) == []  # too young: a reader of the old manifest may need it
    time.sleep(1.1)  # S3 stamps whole seconds
    assert sorted(vacuum(root, older_than=0.5)) == sorted([superseded.path, crashed.path])
    assert orphans(root) == [] and read_manifest(root).paths == [listed.path]
    errors = []
    holder = lease.acquire(root, "a writer", heartbeat=False)
    try:
        t = _threading.Thread(target=lambda: errors.append(pytest.raises(lease.LeaseHeldError, vacuum, root, 0)))
        t.start()
        t.join()
    finally:
        holder.release()
    assert len(errors) == 1 and "a writer" in str(errors[0].value)
