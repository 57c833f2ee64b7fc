"""Evaluation stage: mAP / P@T / PR of compact-code retrieval, single- and cross-domain.

- ``protocols``: datasets (identity folders, face shards) and their query/database splits
- ``methods``: OPQN variants, DPQ and DCDH by name; one training loop; checkpoint loading
- ``baselines``: the DPQ and DCDH networks
- ``evaluation``: ``evaluate_model`` (metrics + float upper bound), ``evaluate_url``
- ``report``: metrics.json, PR / P@T plots, markdown
- ``cli``: ``opqn evaluate`` and ``opqn train-method``
"""
