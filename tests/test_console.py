"""A quiet console: Ray's own chatter is dropped from the forwarded worker output unless --verbose."""
from __future__ import annotations

import re

from pipelines import execution

ENGINE_LINES = [
    "Failed to query Ray Train Controller actor state. State API may be temporarily unavailable. Continuing to monitor.",
    "[2026-12-02 09:41:03,725 E 16469 16501] core_worker.cc:2465: Actor with class name: 'PreemptionWatcher' and "
    "ID: '52c9' has constructor arguments in the object store and max_restarts > 0.",
    "Requesting resources: {'CPU': 1.0} * 2",
    "Attempting to start training worker group of size 2 with the following resources: [{'CPU': 1.0}] * 2",
    "Started training worker group of size 2: ",
    "- (ip=127.0.0.1, pid=16570) world_rank=0, local_rank=0, node_rank=0",
    "Setting up process group for: env:// [rank=0, world_size=2]",
    "Moving model to device: cpu",
    "Wrapping provided model in DistributedDataParallel.",
    "Reporting training result 1: TrainingReport(checkpoint=None, metrics={'epoch': 1}, validation=False) from rank 0",
    "Progress bars disabled. To enable, set `ray.data.DataContext.get_current().enable_progress_bars = True`.",
    "WARNING: 8 PYTHON worker processes have been started on node: b3ae with address: 127.0.0.1, which is 4x the "
    "maximum expected startup concurrency of 2",
]
JOB_LINES = [
    "[train] epoch 1/2 loss 25.9478 clf_x 25.2859 clf_s 26.1333 entropy 2.3674 acc 0.188 250.3 samples/s",
    "resuming /tmp/m.pt at epoch 1/2",
    "Traceback (most recent call last):",
    "ValueError: no training batch reached the workers",
]


def test_engine_noise_matches_ray_chatter_and_never_the_jobs_lines():
    noise = re.compile(execution.ENGINE_NOISE)
    assert all(noise.search(line) for line in ENGINE_LINES)
    assert not any(noise.search(line) for line in JOB_LINES)


def test_quiet_unless_verbose(monkeypatch):
    for name in ("RAY_DEDUP_LOGS_SKIP_REGEX", "RAY_COLOR_PREFIX"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("OPQN_VERBOSE", "1")
    execution.quiet_engines()
    import os

    assert "RAY_DEDUP_LOGS_SKIP_REGEX" not in os.environ
    monkeypatch.delenv("OPQN_VERBOSE")
    execution.quiet_engines()
    assert os.environ["RAY_DEDUP_LOGS_SKIP_REGEX"] == execution.ENGINE_NOISE
    assert os.environ["RAY_COLOR_PREFIX"] == "0"  # pytest's stdout is no terminal



def test_progress_lines_are_records_of_the_stages_logger_printed_as_they_are(capsys):
    """The console shows each line as it is (no level or logger name), to the stream the stage
    was given; the stage's logger filters them like any log."""
    import io
    import logging

    from pipelines.progress import Progress, say

    out = io.StringIO()
    Progress(2, "shards", "query 1/2", interval=0, stream=out).update(2)
    say("train", "[train] epoch 1/2 loss 1.0", out)
    say("pipeline", "[pipeline] stage train ...")  # no stream: stderr
    lines = out.getvalue().splitlines()
    assert len(lines) == 2 and lines[0].startswith("[query 1/2] 2/2 shards (100%) ") and lines[1] == "[train] epoch 1/2 loss 1.0"
    assert capsys.readouterr().err == "[pipeline] stage train ...\n"
    logger = logging.getLogger("opqn.train")
    logger.setLevel(logging.WARNING)
    try:
        say("train", "[train] epoch 2/2 loss 0.5", out)
    finally:
        logger.setLevel(logging.NOTSET)
    assert "epoch 2/2" not in out.getvalue()
