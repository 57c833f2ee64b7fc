"""Pipeline stages joining model/ (torch) and storage/ (URLs): ingest, train, encode, query, evaluate."""
import os

# Ray reads these once, when it is first imported. The embedded default is in-process Ray on
# one machine, which should stay on loopback; with RAY_ADDRESS (a real cluster) Ray's own
# address detection applies.
if not os.environ.get("RAY_ADDRESS"):
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# Ray Train both prints a worker's print() and logs it, so a worker's line would show twice
# where worker output is forwarded (`--verbose`); the epoch lines come from the driver.
os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
