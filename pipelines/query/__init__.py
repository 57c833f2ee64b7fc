"""Batch query stage: exact LUT scoring of gallery code shards in Ray tasks, per-task top-k, merge.

``kernels`` (score a block of codes: torch gather-sum, faiss IndexPQ / IndexPQFastScan with a
certified exact re-rank), ``topk`` (one shard, one task's group of shards, the merge), ``rerank``
(``--rerank R``: the PQ top-R re-scored by the cosine of the stored float features), ``run``
(the driver ``query_batch``), ``cli`` (``opqn query``).
"""
