"""Distributed OPQN training on Ray Train (DDP over face shards read with Ray Data)."""
