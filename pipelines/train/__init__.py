"""Training: one recipe (``recipe``), one loop (``loop``), run in one process (``local``: OPQN with
end-of-run metrics, and any method for comparisons) or on Ray Train (``run`` drives, ``worker``:
DDP workers that keep their share of the face shards in memory); ``cli`` holds the commands."""
