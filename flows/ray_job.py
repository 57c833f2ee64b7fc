"""`opqn train` as a Ray job: one job per run, followed until it ends, stopped with its flow.

A retried or re-run flow must not start a second job training into the same model URL, so
the job's submission id is derived from the command itself (the model URL and every
setting that differs from the default): the same run always maps to the same id. Before
submitting, the cluster's job list is the lock: a job of this run that is pending or
running, or that succeeded, is followed again instead of being started twice; a job of the
same model URL with other settings still running is refused with the command that stops
it. After a failed or stopped attempt the next one gets the id with ``-2``, ``-3``, ...,
and resumes from the checkpoint the earlier attempt left (``resume`` is on by default).

The job's log is followed live (``tail_job_logs``) into ``log``, one call per line; if the
follower is interrupted (Prefect turns a cancellation into ``TerminationSignal`` in the
flow's main thread, a terminal gives ``KeyboardInterrupt``) it stops the job before it
returns the interruption.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import queue
import shlex
import threading
import time
from collections.abc import Callable

MODEL_KEY = "opqn_model_url"  # job metadata: which model URL a job trains into
STOP_WAIT_SECONDS = 10.0  # within the grace a Prefect worker gives a cancelled run before SIGKILL
LOG_GRACE_SECONDS = 10.0  # how long the log may trail the job's end


def submission_id(args: list[str], attempt: int = 1) -> str:
    """``opqn-train-<16 hex of the command>``, with ``-N`` for the Nth attempt."""
    base = "opqn-train-" + hashlib.sha256(json.dumps(args).encode()).hexdigest()[:16]
    return base if attempt == 1 else f"{base}-{attempt}"


def _attempt(job_id: str, base: str) -> int:
    if job_id == base:
        return 1
    tail = job_id[len(base) + 1:] if job_id.startswith(base + "-") else ""
    return int(tail) if tail.isdigit() else 0


def submit_or_attach(client, args: list[str], model_url: str, log: Callable[[str], None]) -> tuple[str, bool]:
    """Submit ``args`` (an `opqn train` command line) as a job, or find this run's job already
    on the cluster; returns ``(submission_id, attached)``."""
    from ray.job_submission import JobStatus

    base = submission_id(args)
    same_model = [j for j in client.list_jobs() if (j.metadata or {}).get(MODEL_KEY) == model_url]
    ours = {j.submission_id: j for j in same_model if j.submission_id and _attempt(j.submission_id, base)}
    for job in same_model:
        if job.status.is_terminal():
            continue
        if job.submission_id in ours:
            log(f"Ray job {job.submission_id} of this run is {job.status.value}: following it instead of starting "
                f"another")
            return job.submission_id, True
        raise ValueError(f"Ray job {job.submission_id} is already training into {model_url} with other settings "
                         f"({job.status.value}); wait for it, or stop it: ray job stop {job.submission_id} "
                         f"--address {client.get_address()}")
    done = [j for j in ours.values() if j.status == JobStatus.SUCCEEDED]
    if done:
        log(f"Ray job {done[0].submission_id} of this run already succeeded: not training again (delete it with "
            f"`ray job delete {done[0].submission_id}` to rerun the same settings)")
        return done[0].submission_id, True
    job_id = submission_id(args, max((_attempt(j, base) for j in ours), default=0) + 1)
    entrypoint = shlex.join(args)
    try:
        client.submit_job(entrypoint=entrypoint, submission_id=job_id, metadata={MODEL_KEY: model_url})
    except RuntimeError as exc:
        if "already exists" not in str(exc):
            raise
        log(f"Ray job {job_id} was submitted at the same moment by another run: following it")
        return job_id, True
    log(f"submitted Ray job {job_id}: {entrypoint}")
    return job_id, False


def _tail(client, job_id: str, lines: queue.Queue) -> None:
    """Follow the job's log in this thread's own event loop; puts each line, then None at the end
    (or the exception that ended the follow early)."""
    async def follow():
        pending = ""
        async for chunk in client.tail_job_logs(job_id):
            *complete, pending = (pending + chunk).split("\n")
            for line in complete:
                lines.put(line)
        if pending:
            lines.put(pending)

    try:
        asyncio.run(follow())
        lines.put(None)
    except Exception as exc:  # noqa: BLE001 - the status poll still ends the follow; say why the log stopped
        lines.put(exc)


def follow_job(client, job_id: str, log: Callable[[str], None], poll_seconds: float = 1.0):
    """Stream the job's log into ``log`` (called in this thread) until the job ends; returns its
    final ``JobStatus``. Any interruption (cancellation, Ctrl-C, an error in ``log``) stops the
    job first."""
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=_tail, args=(client, job_id, lines), name=f"ray-job-log-{job_id}", daemon=True).start()
    try:
        ended_at = None
        while True:
            try:
                line = lines.get(timeout=poll_seconds)
            except queue.Empty:
                # a quiet log: the job may have ended with its log still open for a moment
                if ended_at is None and client.get_job_status(job_id).is_terminal():
                    ended_at = time.monotonic()
                if ended_at is not None and time.monotonic() - ended_at > LOG_GRACE_SECONDS:
                    break
                continue
            if line is None:
                break
            if isinstance(line, Exception):
                log(f"the log of Ray job {job_id} stopped early ({line}); `ray job logs {job_id}` has all of it")
                break
            log(line)
        while not (status := client.get_job_status(job_id)).is_terminal():
            time.sleep(poll_seconds)
        return status
    except BaseException:
        stop_job(client, job_id, log)
        raise


def stop_job(client, job_id: str, log: Callable[[str], None], wait_seconds: float = STOP_WAIT_SECONDS):
    """Ask the cluster to stop the job and wait (bounded) until it has ended."""
    client.stop_job(job_id)
    deadline = time.monotonic() + wait_seconds
    while not (status := client.get_job_status(job_id)).is_terminal() and time.monotonic() < deadline:
        time.sleep(0.5)
    log(f"stopped Ray job {job_id}: {status.value}")
    return status


def failure_message(client, job_id: str, status) -> str:
    info = client.get_job_info(job_id)
    message = f"Ray job {job_id} ended {status.value}: {info.message}"
    if info.driver_exit_code == 127 or "exit code 127" in (info.message or ""):
        message += ("; `opqn` is not on the head node's PATH: start the head from the project's virtualenv "
                    "(`source .venv/bin/activate; ray start --head ...`) or use an image with it first on PATH")
    return message


def run_train_job(address: str, args: list[str], model_url: str, log: Callable[[str], None],
                  poll_seconds: float = 1.0) -> dict:
    """Submit (or reattach to) the training job and follow it to the end; raises if it did not
    succeed."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(address)
    job_id, attached = submit_or_attach(client, args, model_url, log)
    status = follow_job(client, job_id, log, poll_seconds)
    if status != JobStatus.SUCCEEDED:
        raise RuntimeError(failure_message(client, job_id, status))
    return {"model_url": model_url, "ray_job_id": job_id, "reattached": attached}
