"""Errors a user can cause end in one line naming the fix, exit 1, no traceback (``--verbose`` shows it)."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

from pipelines.cli import main, user_error

REPO = Path(__file__).resolve().parent.parent


def opqn(*argv: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipelines.cli", *argv], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def one_error_line(proc: subprocess.CompletedProcess, command: str) -> str:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert lines[0].startswith(f"opqn {command}: error: "), lines[0]
    return lines[0]


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_s3_endpoint_is_one_line_naming_the_setting(tmp_path):
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{closed_port()}", "AWS_MAX_ATTEMPTS": "1",
           "AWS_ACCESS_KEY_ID": "opqn-test", "AWS_SECRET_ACCESS_KEY": "opqn-test", "AWS_DEFAULT_REGION": "us-east-1"}
    line = one_error_line(opqn("gallery", "info", "s3://opqn-test/gallery", env=env), "gallery info")
    assert "unreachable" in line and "AWS_ENDPOINT_URL" in line
    # the main job checks its inputs before Ray starts
    proc = opqn("pipeline", "--data", "s3://opqn-test/photos", "--workdir", str(tmp_path / "w"), env=env)
    assert "AWS_ENDPOINT_URL" in one_error_line(proc, "pipeline")
    assert not (tmp_path / "w").exists()


def test_missing_path_is_one_line_and_the_main_job_fails_before_ray(tmp_path):
    line = one_error_line(opqn("gallery", "info", str(tmp_path / "nowhere")), "gallery info")
    assert str(tmp_path / "nowhere") in line
    proc = opqn("pipeline", "--data", str(tmp_path / "typo"), "--workdir", str(tmp_path / "w"))
    line = one_error_line(proc, "pipeline")
    assert "typo" in line and "--data" in line and not proc.stdout


def test_verbose_shows_the_traceback_anywhere_on_the_line(tmp_path):
    proc = opqn("gallery", "info", str(tmp_path / "nowhere"), "--verbose")
    assert proc.returncode == 1 and "Traceback" in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("opqn gallery info: error: ")


def test_user_errors_name_a_fix_and_bugs_keep_their_traceback(tmp_path):
    from storage.errors import CommitConflictError

    assert user_error(PermissionError(13, "Permission denied", "/x")) == \
        "Permission denied: /x; check the permissions of the path, or the object store's credentials"
    assert "run again" in user_error(CommitConflictError("commit to m lost the race 5 times", "m"))
    assert user_error(ValueError("bits=7 (want a multiple of log2(K))")) == "bits=7 (want a multiple of log2(K))"
    assert user_error(FileNotFoundError("face dataset not found: d")) == "face dataset not found: d; check the path or URL"
    assert user_error(FileNotFoundError("no gallery at g: encode one with `opqn encode`")).endswith("`opqn encode`")
    assert user_error(KeyError("x")) is None and user_error(RuntimeError("bug")) is None
    assert main(["gallery", "info", str(tmp_path / "nowhere")]) == 1


def test_errors_inside_ray_train_and_ray_tasks_are_unwrapped():
    """Ray Train reports a worker's exception inside its own wrappers; the line names the user's error."""

    class WorkerException(Exception):  # the shapes of Ray Train's WorkerGroupError / UserExceptionWithTraceback
        def __init__(self, base):
            super().__init__("Traceback (most recent call last):\n  ...")
            self._base_exc = base

    class WorkerGroupError(Exception):
        def __init__(self, failures):
            super().__init__("Training failed due to worker errors:\n...")
            self.worker_failures = failures

    small = ValueError("no training batch reached the workers: lower --batch-size")
    assert user_error(WorkerGroupError({1: RuntimeError("other"), 0: WorkerException(small)})) == str(small)

    class TaskError(Exception):
        cause = FileNotFoundError("source folder not found: s3://b/photos")

    assert user_error(TaskError("remote traceback\n...")) == \
        "source folder not found: s3://b/photos; check the path or URL"
    assert user_error(WorkerGroupError({0: WorkerException(KeyError("bug"))})) is None


def test_refusing_s3_is_one_line_naming_the_credentials(s3_bucket):
    line = one_error_line(opqn("gallery", "info", f"{s3_bucket}/gallery", env={"AWS_SECRET_ACCESS_KEY": "wrong"}),
                          "gallery info")
    assert "AWS_ACCESS_KEY_ID" in line and "wrong" not in line
