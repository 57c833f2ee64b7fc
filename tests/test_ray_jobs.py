"""train-opqn's Ray Jobs path against a real head node with the dashboard (`ray start --head`).

The head is this test's own (temp dir, free ports, its own process group), separate from the
session's Ray fixtures, and is killed in a finally. It is started the way docs/operations.md
says: from the project's virtualenv, so `opqn` is on the job's PATH and the project imports.
"""
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import psutil
import pytest

from face_datasets import write_face_dataset
from flows.ray_job import follow_job, submit_or_attach, submission_id

pytestmark = pytest.mark.slow

VENV_BIN = Path(sys.executable).parent


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _kill_group(pgid: int) -> None:
    """Every process of the head's group and their children: `ray stop` for this head only."""
    procs = []
    for p in psutil.process_iter():
        try:
            if os.getpgid(p.pid) == pgid:
                procs += [p, *p.children(recursive=True)]
        except (ProcessLookupError, psutil.Error):
            pass
    for p in procs:
        try:
            p.send_signal(signal.SIGTERM)
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(procs, timeout=3)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass


@pytest.fixture
def head():
    """Dashboard URL of a one-CPU head node on free loopback ports."""
    temp = tempfile.mkdtemp(prefix="opqn-rj-")  # short: Ray's socket paths must fit in 107 bytes
    gcs, dashboard, client, agent = _free_ports(4)
    env = {**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
           "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0",
           # token auth (Ray's default) is the operator's setting, not what this test is about:
           # off, so the client here needs no token whatever this process's Ray config says
           "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    # its own session: the daemons `ray start` leaves behind keep its process group
    proc = subprocess.Popen(
        [str(VENV_BIN / "ray"), "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(gcs),
         "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard), "--ray-client-server-port",
         str(client), "--dashboard-agent-listen-port", str(agent), "--num-cpus", "1", "--temp-dir", temp,
         "--disable-usage-stats"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0, out[-3000:]
        yield f"http://127.0.0.1:{dashboard}"
    finally:
        _kill_group(proc.pid)
        shutil.rmtree(temp, ignore_errors=True)


def test_training_job_logs_reattach_and_stop(head, lfw_dir, tmp_path):
    from ray.job_submission import JobStatus, JobSubmissionClient

    dataset = write_face_dataset(tmp_path / "faces", lfw_dir, identities=4, photos=6, size=40)
    model_url = str(tmp_path / "model.pt")
    args = ["opqn", "train", str(dataset), model_url, "--bits", "16", "--codewords", "16", "--dim", "64",
            "--width", "0.125", "--image-size", "32", "--batch-size", "8", "--workers", "1", "--epochs", "50"]
    client = JobSubmissionClient(head)
    notes: list[str] = []
    job_id, attached = submit_or_attach(client, args, model_url, notes.append)
    assert (job_id, attached) == (submission_id(args), False)

    # a retried flow computes the same id and follows the job instead of starting another
    assert submit_or_attach(client, args, model_url, notes.append) == (job_id, True)
    assert [j.submission_id for j in client.list_jobs()] == [job_id]
    # another run training into the same model URL is refused while this one runs
    with pytest.raises(ValueError, match=f"ray job stop {job_id}"):
        submit_or_attach(client, args + ["--lr", "0.05"], model_url, notes.append)

    lines: list[str] = []

    def log(line: str) -> None:
        lines.append(line)
        if line.startswith("[train] epoch 1/50"):
            raise KeyboardInterrupt  # what a cancelled flow run raises in its follower

    with pytest.raises(KeyboardInterrupt):
        follow_job(client, job_id, log, poll_seconds=0.2)
    # the job's log is the driver's console: its own lines, the epoch line from the driver, and
    # nothing forwarded from Ray Train's workers or controller
    first = next(i for i, line in enumerate(lines) if line.startswith("training OPQN-opqn 16 bit"))
    assert all(re.match(r"(data: |note: |\[train\] epoch )", line) for line in lines[first + 1:-1]), lines
    assert len(lines[:first]) <= 3, lines  # Ray Jobs' own header: runtime env, entrypoint
    assert lines[-1] == f"stopped Ray job {job_id}: STOPPED"
    assert client.get_job_status(job_id) == JobStatus.STOPPED

    # the next attempt of the same run gets a fresh id (the stopped job keeps its own)
    retry, attached = submit_or_attach(client, args, model_url, notes.append)
    assert (retry, attached) == (submission_id(args, 2), False)
    client.stop_job(retry)
