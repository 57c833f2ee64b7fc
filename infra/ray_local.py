"""A local multi-node Ray cluster on 127.0.0.1 for development and tests.

One supervisor process starts a head node and extra nodes (separate raylets on this machine,
so Ray schedules across them exactly as across machines), prints the address, and tears the
whole cluster down on SIGTERM. Stop it by the PID it writes.

    python -m infra.ray_local start --nodes 2 --cpus-per-node 2 --pid-file /tmp/ray.pid
    RAY_ADDRESS=127.0.0.1:PORT opqn train ...
    python -m infra.ray_local stop --pid-file /tmp/ray.pid
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # bind and advertise loopback
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def serve(nodes: int, cpus_per_node: float, address_file: str | None) -> None:
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": cpus_per_node, "include_dashboard": False})
    for _ in range(nodes - 1):
        cluster.add_node(num_cpus=cpus_per_node)
    cluster.wait_for_nodes()
    stopping = False

    def stop(*_):
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    if address_file:
        with open(address_file + ".tmp", "w") as f:
            f.write(cluster.address)
        os.replace(address_file + ".tmp", address_file)
    print(f"ray cluster up: {nodes} node(s) x {cpus_per_node:g} CPU at {cluster.address}", flush=True)
    print(f"export RAY_ADDRESS={cluster.address}", flush=True)
    while not stopping:
        time.sleep(0.2)
    cluster.shutdown()
    print("ray cluster stopped", flush=True)


def start(nodes: int = 2, cpus_per_node: float = 2, pid_file: str | None = None, timeout: float = 120) -> tuple[subprocess.Popen, str]:
    """Start the supervisor in the background; returns (process, address) once the cluster is up."""
    import tempfile

    address_file = tempfile.mktemp(prefix="opqn-ray-address-")
    proc = subprocess.Popen([sys.executable, "-m", "infra.ray_local", "serve", "--nodes", str(nodes),
                             "--cpus-per-node", str(cpus_per_node), "--address-file", address_file],
                            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    if pid_file:
        with open(pid_file, "w") as f:
            f.write(str(proc.pid))
    deadline = time.monotonic() + timeout
    while not os.path.exists(address_file):
        if proc.poll() is not None:
            raise RuntimeError(f"local Ray cluster exited during start-up (code {proc.returncode})")
        if time.monotonic() > deadline:
            stop_pid(proc.pid)
            raise TimeoutError(f"local Ray cluster not up after {timeout:.0f} s")
        time.sleep(0.2)
    with open(address_file) as f:
        address = f.read().strip()
    os.unlink(address_file)
    return proc, address


def stop_pid(pid: int, timeout: float = 60) -> None:
    """SIGTERM the supervisor (it shuts its nodes down), SIGKILL its group if it hangs."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        try:
            if os.waitpid(pid, os.WNOHANG)[0] == pid:
                return
        except ChildProcessError:
            pass
        time.sleep(0.2)
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("start", "serve"):
        p = sub.add_parser(name)
        p.add_argument("--nodes", type=int, default=2)
        p.add_argument("--cpus-per-node", type=float, default=2)
        p.add_argument("--pid-file")
        p.add_argument("--address-file")
    p = sub.add_parser("stop")
    p.add_argument("--pid-file", required=True)
    args = ap.parse_args(argv)
    if args.cmd == "serve":
        serve(args.nodes, args.cpus_per_node, args.address_file)
    elif args.cmd == "start":
        proc, address = start(args.nodes, args.cpus_per_node, args.pid_file)
        print(f"ray cluster up (supervisor pid {proc.pid})\nexport RAY_ADDRESS={address}")
    else:
        with open(args.pid_file) as f:
            stop_pid(int(f.read().strip()))
        os.unlink(args.pid_file)
    return 0


if __name__ == "__main__":
    sys.exit(main())
