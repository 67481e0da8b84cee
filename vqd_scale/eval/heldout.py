"""Held-out evaluation records: the first `num` samples of token shards, in a fixed order.

Evaluation must see the same captions for every checkpoint, so shards are read in pattern order
without shuffling or resampling (unlike the training loader). Records are small (a few KiB), so
every rank reads them all and takes its slice.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import braceexpand
import numpy as np
import torch

from vqd_scale.data import schema
from vqd_scale.data.shards import read_shard
from vqd_scale.errors import MissingInput, UserError


@dataclass
class HeldOut:
    """N held-out pairs; the optional fields are None when the shards lack them."""
    keys: list[str]
    captions: list[str]
    text_tokens: torch.Tensor  # Long[N, 77]
    image_tokens: torch.Tensor  # Long[N, h, w]
    image_emb: Optional[torch.Tensor] = None  # F[N, E]
    text_emb: Optional[torch.Tensor] = None  # F[N, E]
    tokenizer_id: Optional[str] = None

    def __len__(self) -> int:
        return len(self.keys)


def expand(pattern: str) -> list[str]:
    """Braceexpand each `::`-separated pattern, in order."""
    return [p for part in pattern.split("::") if part.strip() for p in braceexpand.braceexpand(part.strip())]


def read_heldout(pattern: str, num: int) -> HeldOut:
    """The first `num` records of the shards matched by `pattern` (eval.shards)."""
    if not pattern:
        raise UserError("eval.shards is empty: point it at held-out token shards (e.g. 'DIR/{00000..00001}.tar')")
    paths = expand(pattern)
    missing = [p for p in paths if "://" not in p and not p.startswith("pipe:") and not Path(p).is_file()]
    if missing:
        raise MissingInput(f"eval.shards: {len(missing)} of {len(paths)} shards not found, e.g. {missing[0]}")
    recs, errors, ids = [], {}, set()
    for path in paths:
        for raw in read_shard(path, errors):
            if not all(m in raw for m in schema.REQUIRED):
                continue
            recs.append(raw)
            if len(recs) == num:
                break
        if len(recs) == num:
            break
    if len(recs) < num:
        raise UserError(f"eval.shards has only {len(recs)} readable records but eval.num_samples={num}; "
                         f"add held-out shards or lower eval.num_samples (read errors: {errors.get('_last')})")
    for r in recs:
        if schema.META in r:
            ids.add(json.loads(r[schema.META]).get("tokenizer_id"))
    if len(ids - {None}) > 1:
        raise UserError(f"eval.shards mix image tokenizers {sorted(ids - {None})}; use shards of one tokenizer")

    def stack(member, dtype):
        if not all(member in r for r in recs):
            return None
        return torch.from_numpy(np.stack([schema.load_npy(r[member]) for r in recs]).astype(dtype))

    return HeldOut(keys=[r["__key__"] for r in recs],
                   captions=[r.get(schema.CAPTION, b"").decode("utf-8") for r in recs],
                   text_tokens=stack(schema.TEXT_TOKENS, np.int64), image_tokens=stack(schema.IMAGE_TOKENS, np.int64),
                   image_emb=stack(schema.IMAGE_EMB, np.float32), text_emb=stack(schema.TEXT_EMB, np.float32),
                   tokenizer_id=next(iter(ids - {None}), None))
