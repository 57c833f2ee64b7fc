"""Batch query stage: exact LUT scoring of gallery code shards in Ray tasks, per-task top-k, merge.

``kernels`` (score a block of codes: torch gather-sum, faiss IndexPQ / IndexPQFastScan with a
certified exact re-rank), ``topk`` (one shard's top-k, the merge, the grouping of shards into
tasks), ``rerank`` (``--rerank R`` / ``--refine R``: the PQ top-R re-scored by the stored float
features or refine codes), ``scan`` (one task's scan and the fan-out over tasks), ``source`` (the
query set read block by block), ``results`` (a results file, or a results dataset with one
committed file per query block that a killed job resumes), ``run`` (the driver ``query_batch``),
``cli`` (``opqn query``).
"""
