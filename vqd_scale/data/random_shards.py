"""Token shards with random content in the real record format (for loader tests and benchmarks).

Written through the same schema functions as vqd-extract, with a manifest and done-markers, so the
loader cannot tell them from extracted data — only the token values are random.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np

from vqd_scale.data import schema


def write_random_token_shards(out_dir: str | Path, num_shards: int, per_shard: int, token_shape=(8, 8),
                              num_classes: int = 64, embed_dim: Optional[int] = None, seed: int = 0,
                              tokenizer_id: str = "random-000000000000", prefix: str = "") -> list[Path]:
    """Write `{prefix}{00000..}.tar` token shards + done-markers + manifest.json; returns shard paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths, shards = [], []
    for s in range(num_shards):
        path = out / f"{prefix}{s:05d}.tar"
        with schema.tar_writer(path) as sink:
            for i in range(per_shard):
                key = f"{prefix}{s:05d}{i:05d}"
                emb = (lambda: rng.standard_normal(embed_dim).astype(np.float16)) if embed_dim else (lambda: None)
                sink.write(schema.encode_record(
                    key, rng.integers(0, num_classes, size=token_shape), rng.integers(0, 49408, size=77),
                    f"caption {key}", {"source": "random", "tokenizer_id": tokenizer_id}, emb(), emb()))
        schema.write_json_atomic(schema.done_marker_path(path), {
            "output": path.name, "written": per_shard, "skipped": {}, "all_invalid": False,
            "tokenizer_id": tokenizer_id, "num_classes": num_classes, "token_shape": list(token_shape)})
        paths.append(path)
        shards.append({"name": path.name, "count": per_shard})
    schema.write_json_atomic(out / schema.MANIFEST, {
        "format": schema.FORMAT, "tokenizer_id": tokenizer_id, "tokenizer_kind": "random",
        "num_classes": num_classes, "token_shape": list(token_shape), "context_length": 77,
        "embed_dim": embed_dim, "shards": shards, "totals": {"written": num_shards * per_shard},
        "num_failed_shards": 0, "failed_shards": [], "missing_inputs": [], "pending_inputs": [], "complete": True})
    return paths
