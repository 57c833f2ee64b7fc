"""Gallery encoding: face shards -> code shards with a gallery manifest (Ray Data)."""
