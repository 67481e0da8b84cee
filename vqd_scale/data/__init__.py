"""data: token-shard schema, synthetic source, pre-extraction, streaming resumable loader."""
