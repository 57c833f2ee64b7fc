"""Gallery encoding: face shards -> code shards with a gallery manifest (one task per source
shard), and the `opqn gallery` maintenance commands."""
