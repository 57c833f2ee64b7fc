"""Where the stages' work runs: one way to start or join Ray, one way to run many tasks.

Ingest, encode and query all fan independent tasks (a shard of photos, a source shard,
a group of code shards) out over a cluster and fold the results in as they arrive. They
share ``run_tasks``, which keeps at most ``max_in_flight`` tasks submitted so the driver's
memory is bounded by what is in flight, not by the job, and which runs the same function
in this process (``executor="local"``) for debugging and small jobs.

``start_ray`` is the only place that calls ``ray.init``: it joins the cluster named by
``RAY_ADDRESS``, or starts a private Ray on loopback, with Ray's own console output kept
down to warnings.
"""
from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Iterable, Iterator
from typing import Any

EXECUTORS = ("ray", "local")

_CACHE: dict = {}

# Ray's own chatter in the worker output it forwards to the driver's console: Ray Train's
# start-up and per-report lines (each worker's whole metrics dict every epoch; the job prints
# its own epoch line), the placement-group cleaner's "State API unavailable" warning, which
# repeats every second without a dashboard, and Ray Data's notice that the progress bars
# start_ray turned off are off. start_ray forwards worker output only with `--verbose`
# (OPQN_VERBOSE), which keeps all of it; this filter is for a caller that asks for worker
# output (``worker_logs=True``) without it, and for the raylet's warnings, which reach every
# driver's console whatever ``worker_logs`` says ("N PYTHON worker processes have been
# started": worker start-up on a busy machine).
ENGINE_NOISE = "|".join([
    r"Failed to query Ray Train Controller actor state",
    r"has constructor arguments in the object store and max_restarts",
    r"Requesting resources: \{",
    r"Attempting to start training worker group",
    r"Started training worker group of size",
    r"^- \(ip=[^)]*\) world_rank=",
    r"Setting up process group for: ",
    r"Moving model to device: ",
    r"Wrapping provided model in DistributedDataParallel",
    r"Reporting training result \d+: TrainingReport\(",
    r"Progress bars (for operators )?disabled\. To enable",
    r"PYTHON worker processes have been started on node",
])


def quiet_engines() -> None:
    """Keep Ray's internals off the console unless ``OPQN_VERBOSE`` is set.

    Ray reads ``RAY_DEDUP_LOGS_SKIP_REGEX`` when it is first imported, so this runs when this
    module is imported (every stage imports it before Ray) and again in ``start_ray``. Settings
    the user made in the environment win. ``RAY_COLOR_PREFIX=0``: no ANSI codes in a log file.
    """
    if os.environ.get("OPQN_VERBOSE"):
        return
    os.environ.setdefault("RAY_DEDUP_LOGS_SKIP_REGEX", ENGINE_NOISE)
    if not (hasattr(sys.stdout, "isatty") and sys.stdout.isatty()):
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")
    # "token authentication is enabled": the safe default, said on every start; "progress bars
    # disabled": start_ray turns them off on purpose (the stages print their own progress)
    for name in ("ray._private.authentication.authentication_token_setup", "ray.data._internal.progress"):
        logging.getLogger(name).setLevel(logging.ERROR)


quiet_engines()


_spare_cpus = 0  # CPUs the local Ray started here declares beyond the machine's cores


def start_ray(num_cpus: int | None = None, *, worker_logs: bool | None = None, object_store_mb: int | None = None):
    """Join ``RAY_ADDRESS`` or start Ray in-process on 127.0.0.1; a no-op when Ray is up.

    ``num_cpus`` (local Ray only) defaults to the cores plus one: a pool that fills every
    core still leaves Ray Data a slot for its read tasks. ``worker_logs`` forwards the
    workers' stdout/stderr to this console; off unless ``OPQN_VERBOSE`` (``--verbose``): the
    stages' workers print nothing of their own (training's epoch lines come from the driver,
    train/epoch_log.py), so what would arrive is Ray's internals, and a worker's error
    reaches the driver as the task's exception anyway.
    ``object_store_mb`` caps a local Ray's object store (memory benchmarks). Returns the
    ``ray`` module.
    """
    global _spare_cpus
    quiet_engines()
    import ray
    import ray.data

    if not ray.is_initialized():
        if worker_logs is None:
            worker_logs = bool(os.environ.get("OPQN_VERBOSE"))
        common = {"log_to_driver": worker_logs, "logging_level": logging.WARNING}
        address = os.environ.get("RAY_ADDRESS")
        if address:
            ray.init(address=address, **common)
        else:
            # "local" always starts a private instance; a bare ray.init() would attach to
            # any cluster someone started on this machine with `ray start`.
            store = {"object_store_memory": object_store_mb * 2**20} if object_store_mb else {}
            _spare_cpus = 0 if num_cpus else 1
            ray.init(address="local", num_cpus=num_cpus or (os.cpu_count() or 1) + _spare_cpus,
                     include_dashboard=False, _node_ip_address="127.0.0.1", **store, **common)
    ctx = ray.data.DataContext.get_current()
    # the stages print their own progress lines (counts, rate, ETA); Ray Data's
    # per-operator tables every few seconds would drown them in a log
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    return ray


def cluster_cpus() -> int:
    """Logical CPUs of the Ray cluster (starting Ray if needed)."""
    return max(1, int(start_ray().cluster_resources().get("CPU", 1)))


def cluster_gpus() -> int:
    return int(start_ray().cluster_resources().get("GPU", 0))


def node_id() -> str:
    """The Ray node a task runs on, or "local" for a task run in the driver (``executor="local"``),
    even when the driver has Ray started."""
    try:
        import ray
        from ray._private.worker import WORKER_MODE

        if ray.is_initialized() and ray.get_runtime_context().worker.mode == WORKER_MODE:
            return ray.get_runtime_context().get_node_id()
    except Exception:  # noqa: BLE001 - outside a Ray worker there is no node to name
        pass
    return "local"


def process_cached(key, make: Callable[[], Any]) -> Any:
    """One object per worker process and key, kept across tasks (Ray reuses task workers):
    a detector or a model is built once per process, not once per task."""
    if key not in _CACHE:
        _CACHE[key] = make()
    return _CACHE[key]


def task_slots(num_cpus: float, num_gpus: float = 0, *, cores_only: bool = False) -> int:
    """Tasks of ``num_cpus`` CPUs (and ``num_gpus`` GPUs) the cluster runs at once (at least 1).

    ``cores_only`` leaves out the spare CPU a local Ray started by ``start_ray`` declares (for
    Ray Data's read tasks): CPU-bound tasks such as the query scan run one per core, since a
    third task on two cores only shares them (docs/operations.md, *Capacity*)."""
    cpus = cluster_cpus()
    cpus -= _spare_cpus if cores_only and cpus > _spare_cpus else 0
    slots = max(1, int(cpus // max(num_cpus, 1e-9)))
    if num_gpus:
        slots = min(slots, max(1, int(cluster_gpus() // num_gpus)))
    return slots


def run_tasks(fn: Callable, items: Iterable, *, shared: tuple = (), executor: str = "ray",
              max_in_flight: int | None = None, num_cpus: float = 1, num_gpus: float = 0,
              spread: bool = False, max_retries: int = 3) -> Iterator[tuple[Any, Any]]:
    """Yield ``(item, fn(item, *shared))`` for every item, in completion order.

    On Ray each item is one task; ``shared`` objects go to the object store once and every
    task reads them from there (no per-task copy of query tables or a model). At most
    ``max_in_flight`` tasks are submitted at a time (default: two per task slot of the
    cluster), and items are pulled from ``items`` lazily, so a generator of tasks is never
    materialised. ``spread`` places tasks on as many nodes as possible (I/O-bound scans);
    a task that dies with its worker is retried ``max_retries`` times.
    """
    if executor not in EXECUTORS:
        raise ValueError(f"executor {executor!r} is not one of {EXECUTORS}")
    if executor == "local":
        for item in items:
            yield item, fn(item, *shared)
        return
    ray = start_ray()
    remote = ray.remote(fn).options(num_cpus=num_cpus, num_gpus=num_gpus, max_retries=max_retries,
                                    scheduling_strategy="SPREAD" if spread else "DEFAULT")
    refs = [ray.put(obj) for obj in shared]
    limit = max_in_flight or 2 * task_slots(num_cpus, num_gpus)
    source = iter(items)
    in_flight: dict = {}
    exhausted = False
    while True:
        while not exhausted and len(in_flight) < limit:
            try:
                item = next(source)
            except StopIteration:
                exhausted = True
                break
            in_flight[remote.remote(item, *refs)] = item
        if not in_flight:
            return
        ready, _ = ray.wait(list(in_flight), num_returns=1)
        item = in_flight.pop(ready[0])
        yield item, ray.get(ready[0])
