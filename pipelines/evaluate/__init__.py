"""Evaluation stage: mAP / P@T / PR of compact-code retrieval, single- and cross-domain.

- ``protocols``: datasets (identity folders, face shards) and their query/database splits
- ``evaluation``: the evaluator, ``evaluate_model`` (metrics + float upper bound) for any
  method of ``model.registry``; ``evaluate_url`` (checkpoints -> report); ``train_summary``
- ``report``: metrics.json, PR / P@T plots, markdown
- ``cli``: ``opqn evaluate``
"""
