"""Batch query stage: exact LUT scoring of gallery code shards in Ray tasks, per-task top-k, merge.

``kernels`` (score a block of codes: torch gather-sum, faiss IndexPQ / IndexPQFastScan with a
certified exact re-rank), ``topk`` (one shard, one task's group of shards, the merge), ``run``
(the driver ``query_batch``), ``cli`` (``opqn query``).
"""
