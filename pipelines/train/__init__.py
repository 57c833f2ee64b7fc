"""Distributed OPQN training on Ray Train: DDP workers that keep their share of the face shards in memory."""
