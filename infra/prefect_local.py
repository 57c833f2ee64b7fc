"""A local Prefect server and process worker on 127.0.0.1, for development and tests.

    python -m infra.prefect_local start --home /tmp/prefect --pool opqn   # prints the exports
    python -m infra.prefect_local deploy --pool opqn                       # all deployments in prefect.yaml
    python -m infra.prefect_local stop --home /tmp/prefect

The server keeps its SQLite database under PREFECT_HOME. PIDs of the server and worker are
written there and `stop` signals exactly those processes.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

REPO_DIR = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prefect_bin() -> str:
    return str(Path(sys.executable).with_name("prefect"))


@dataclass
class PrefectStack:
    home: Path
    api_url: str
    pool: str
    server_pid: int
    worker_pid: int | None = None

    def env(self) -> dict[str, str]:
        return base_env(self.home) | {"PREFECT_API_URL": self.api_url, "OPQN_WORK_POOL": self.pool,
                                       "OPQN_REPO_DIR": str(REPO_DIR)}

    def stop(self, timeout: float = 20) -> None:
        """SIGTERM the worker, then the server; each gets ``timeout`` seconds before SIGKILL."""
        for pid in (self.worker_pid, self.server_pid):
            if pid:
                stop_pid(pid, timeout)
        (self.home / "pids.json").unlink(missing_ok=True)


def base_env(home: Path) -> dict[str, str]:
    return {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_WORKER_QUERY_SECONDS": "1", "PREFECT_SERVER_API_HOST": "127.0.0.1",
            "PREFECT_UI_ENABLED": "false", "PREFECT_LOGGING_LEVEL": os.environ.get("PREFECT_LOGGING_LEVEL", "INFO")}


def wait_healthy(api_url: str, proc: subprocess.Popen, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"Prefect server exited during start-up (code {proc.returncode})")
        try:
            with urllib.request.urlopen(f"{api_url}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"Prefect server at {api_url} not healthy after {timeout:.0f} s")


def start(home: str | Path, pool: str = "opqn", worker: bool = True, port: int | None = None) -> PrefectStack:
    """Start server (+ process work pool and worker); returns once the API answers."""
    home = Path(home)
    home.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    api_url = f"http://127.0.0.1:{port}/api"
    env = base_env(home)
    log = open(home / "server.log", "ab")
    server = subprocess.Popen([prefect_bin(), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                              env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    stack = PrefectStack(home, api_url, pool, server.pid)
    try:
        wait_healthy(api_url, server)
        run_prefect(stack, "work-pool", "create", pool, "--type", "process", "--overwrite")
        if worker:
            wlog = open(home / "worker.log", "ab")
            stack.worker_pid = subprocess.Popen(
                [prefect_bin(), "worker", "start", "--pool", pool], env=stack.env(), cwd=REPO_DIR,
                stdout=wlog, stderr=subprocess.STDOUT, start_new_session=True).pid
    except Exception:
        stack.stop()
        raise
    (home / "pids.json").write_text(json.dumps({"server": stack.server_pid, "worker": stack.worker_pid,
                                                "api_url": api_url, "pool": pool}))
    return stack


def run_prefect(stack: PrefectStack, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    out = subprocess.run([prefect_bin(), "--no-prompt", *args], env=stack.env(), cwd=REPO_DIR,
                         capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError(f"prefect {' '.join(args)} failed ({out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return out


def deploy(stack: PrefectStack, *names: str) -> None:
    """Register deployments from prefect.yaml (all, or the named ones) on the stack's pool."""
    args = ["deploy"] + ([a for n in names for a in ("--name", n)] if names else ["--all"])
    run_prefect(stack, *args)


def stop_pid(pid: int, timeout: float = 20) -> None:
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if os.waitpid(pid, os.WNOHANG)[0] == pid:
                return
        except ChildProcessError:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
        time.sleep(0.2)
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def load(home: str | Path) -> PrefectStack:
    info = json.loads((Path(home) / "pids.json").read_text())
    return PrefectStack(Path(home), info["api_url"], info["pool"], info["server"], info["worker"])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("start")
    p.add_argument("--home", required=True)
    p.add_argument("--pool", default="opqn")
    p.add_argument("--port", type=int)
    p.add_argument("--no-worker", action="store_true")
    p = sub.add_parser("deploy")
    p.add_argument("--home", required=True)
    p.add_argument("names", nargs="*")
    p = sub.add_parser("stop")
    p.add_argument("--home", required=True)
    args = ap.parse_args(argv)
    if args.cmd == "start":
        stack = start(args.home, args.pool, worker=not args.no_worker, port=args.port)
        print(f"prefect server {stack.api_url} (pid {stack.server_pid}), worker pid {stack.worker_pid} on pool {stack.pool}")
        print(f"export PREFECT_HOME={stack.home} PREFECT_API_URL={stack.api_url} OPQN_WORK_POOL={stack.pool}")
    elif args.cmd == "deploy":
        deploy(load(args.home), *args.names)
    else:
        load(args.home).stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
