"""Worker side of the loader: one deterministic batch stream per (rank, stream), a function of
(seed, rank, stream, position) so resuming = skipping to a position (shard counts, not decoding).

A stream is one endless sequence of raw samples per source; virtual epochs only cut it into equal
batch counts (every rank and stream yields `batches_per_epoch` per epoch) and do not restart it, so
with `resampled=false` an epoch shorter than a shard still reads every shard to its end, pass after pass.

Stages (run inside a DataLoader worker, composed in loader.py with wds.DataPipeline):
mixed raw samples (weighted interleave of per-source resampled shard readers) → decode/validate →
fixed-size batches with caption dropout, tagged with the stream position after each batch.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from functools import partial
from typing import Iterator, Optional

import numpy as np
import torch

from vqd_scale.data import schema
from vqd_scale.data.shards import count_samples, read_shard

log = logging.getLogger(__name__)
MIX_CHUNK = 4096  # mixing draws come in fixed chunks with their own seed → O(1) random access
_MIX, _SHARDS, _BLOCK, _DROP, _DROP_IMAGE = 1, 2, 3, 4, 5  # domain tags keep the RNG streams independent


@dataclass
class SourceSpec:
    """One source as the workers see it: shard paths, known sample counts (None = count by scanning), weight."""
    name: str
    shards: list[str]
    counts: list[Optional[int]]
    weight: float


@dataclass
class StreamSpec:
    """Everything a worker needs to produce its batches (picklable, no config objects)."""
    sources: list[SourceSpec]
    seed: int
    rank: int
    world_size: int
    num_streams: int
    batch_size: int
    batches_per_epoch: int  # per stream
    resampled: bool
    block: int  # within-shard shuffle block (samples); 0 = keep shard order
    token_shape: tuple[int, int]
    num_classes: int
    context_length: int
    embed_dim: Optional[int]
    with_embeddings: bool
    caption_dropout: float
    max_consecutive_failures: int = 1000
    image_dropout: Optional[float] = None  # None: batches carry no drop_image (a family without image condition)
    captions_optional: bool = False  # image-only records (no txt.tok.npy) kept, with captioned=False; else skipped
    warn_every_s: float = 10.0


@dataclass
class Position:
    """Where a stream is: epoch, batches done in it, raw samples consumed per source since the stream began."""
    epoch: int = 0
    batch: int = 0
    src_pos: list[int] = field(default_factory=list)


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng([int(k) for k in key])


class MixSchedule:
    """Source index of the n-th raw sample of a stream; fixed-size chunks with their own seed give random access."""

    def __init__(self, spec: StreamSpec, stream: int):
        w = np.array([s.weight for s in spec.sources], dtype=np.float64)
        self.p, self.key = w / w.sum(), (spec.seed, spec.rank, stream, _MIX)
        self.chunk, self.draws = -1, None

    def __call__(self, index: int) -> int:
        chunk, off = divmod(index, MIX_CHUNK)
        if chunk != self.chunk:
            self.chunk = chunk
            self.draws = _rng(*self.key, chunk).choice(len(self.p), size=MIX_CHUNK, p=self.p).tolist()
        return self.draws[off]

    def counts(self, n: int) -> list[int]:
        """Raw samples taken from each source among the stream's first n."""
        out = np.zeros(len(self.p), dtype=np.int64)
        full, rest = divmod(n, MIX_CHUNK)
        if len(self.p) == 1:
            return [n]
        for chunk in range(full + (rest > 0)):
            draws = _rng(*self.key, chunk).choice(len(self.p), size=MIX_CHUNK, p=self.p)
            out += np.bincount(draws[: rest if chunk == full else MIX_CHUNK], minlength=len(self.p))
        return out.tolist()


def own_shards(spec: StreamSpec, stream: int, k: int) -> list[int]:
    """Source k's shards this stream reads when not resampling: every (world × streams)-th one."""
    return list(range(len(spec.sources[k].shards)))[spec.rank * spec.num_streams + stream::spec.world_size * spec.num_streams]


def shard_sequence(spec: StreamSpec, stream: int, k: int, first_pass: int = 0) -> Iterator[int]:
    """Shard indices of source k this stream reads, in order: resampled draws, or passes over its own split
    (each pass a fresh permutation), starting at pass `first_pass`."""
    src = spec.sources[k]
    if spec.resampled:
        rng = _rng(spec.seed, spec.rank, stream, _SHARDS, k)
        while True:
            yield from rng.integers(len(src.shards), size=256).tolist()
    mine = own_shards(spec, stream, k)
    p = first_pass
    while True:
        yield from _rng(spec.seed, spec.rank, stream, _SHARDS, k, p).permutation(mine).tolist()
        p += 1


def source_samples(spec: StreamSpec, stream: int, k: int, skip: int, errors: dict,
                   counts_cache: dict) -> Iterator[dict]:
    """Raw samples of source k for this stream, starting after `skip` raw samples."""
    src = spec.sources[k]
    empty_streak, first_pass, seq_base = 0, 0, 0
    mine = own_shards(spec, stream, k)
    if not spec.resampled and all(src.counts[i] for i in mine):
        # whole passes before the resume point are skipped arithmetically, not shard by shard
        per_pass = sum(src.counts[i] for i in mine)
        first_pass, skip = divmod(skip, per_pass)
        seq_base = first_pass * len(mine)
    for seq_i, shard in enumerate(shard_sequence(spec, stream, k, first_pass), start=seq_base):
        if empty_streak > 2 * len(src.shards) + 8:  # cycling through shards that yield nothing would hang
            raise RuntimeError(f"data loader rank {spec.rank} stream {stream}: source {src.name!r} yielded no sample "
                               f"from {empty_streak} shards in a row (last error: {errors.get('_last')}); "
                               f"check that its shards are readable token shards")
        n = src.counts[shard]
        if n is None:
            n = counts_cache.setdefault(src.shards[shard], count_samples(src.shards[shard]))
        if skip >= n:  # whole shard already consumed before the resume point: no I/O at all
            skip -= n
            continue
        got = 0
        for sample in _shuffled(spec, stream, k, seq_i, read_shard(src.shards[shard], errors), skip):
            got += 1
            yield sample
        empty_streak = 0 if got else empty_streak + 1
        skip = 0


def _shuffled(spec: StreamSpec, stream: int, k: int, seq_i: int, it: Iterator[dict],
              skip: int) -> Iterator[dict]:
    """Permute the shard in blocks of spec.block samples (deterministically); drop the first `skip`."""
    if spec.block <= 0:
        for i, s in enumerate(it):
            if i >= skip:
                yield s
        return
    b = 0
    while True:
        block = [s for _, s in zip(range(spec.block), it)]
        if not block:
            return
        if skip >= len(block):  # read but never decoded: skipping stays cheap
            skip -= len(block)
            b += 1
            continue
        order = _rng(spec.seed, spec.rank, stream, _BLOCK, k, seq_i, b).permutation(len(block))
        for j in order[skip:]:
            yield block[j]
        skip, b = 0, b + 1


class _Watch:
    """Counts invalid samples, warns at most every few seconds, raises when nothing valid arrives."""

    def __init__(self, spec: StreamSpec, stream: int, errors: dict):
        self.spec, self.stream, self.errors = spec, stream, errors
        self.consecutive, self.last_warn, self.warned_total = 0, 0.0, 0

    def bad(self, reason: str, key: str) -> None:
        self.errors[reason] = self.errors.get(reason, 0) + 1
        self.errors["_last"] = f"{key}: {reason}"
        self.consecutive += 1
        if self.consecutive >= self.spec.max_consecutive_failures:
            raise RuntimeError(
                f"data loader rank {self.spec.rank} stream {self.stream}: {self.consecutive} consecutive samples "
                f"were invalid or unreadable (counts {self._counts()}, last: {self.errors.get('_last')}); "
                f"every sample is being filtered out — check the shard paths, the manifest and token_shape/num_classes")
        now = time.monotonic()
        if now - self.last_warn > self.spec.warn_every_s:
            self.last_warn = now
            log.warning("data loader rank %d stream %d: skipping invalid samples, counts so far %s (last: %s)",
                        self.spec.rank, self.stream, self._counts(), self.errors.get("_last"))

    def ok(self) -> None:
        self.consecutive = 0

    def _counts(self) -> dict:
        return {k: v for k, v in self.errors.items() if not k.startswith("_")}


def decode(spec: StreamSpec, raw: dict) -> tuple[Optional[dict], str]:
    """Parse and validate one raw record → (numpy fields, "") or (None, reason). Never trusts the bytes."""
    try:
        if schema.IMAGE_TOKENS not in raw:
            return None, "missing_member"
        captioned = schema.TEXT_TOKENS in raw  # image-only records (vqd-extract --keep-uncaptioned) have no text
        if not captioned and not spec.captions_optional:
            return None, "uncaptioned"  # counted like every skip: a caption-reading family never trains on them
        img = schema.load_npy(raw[schema.IMAGE_TOKENS])
        txt = schema.load_npy(raw[schema.TEXT_TOKENS]) if captioned else np.zeros(spec.context_length, np.int32)
        if img.shape != tuple(spec.token_shape) or img.dtype.kind not in "iu":
            return None, "bad_image_tokens"
        if txt.shape != (spec.context_length,) or txt.dtype.kind not in "iu":
            return None, "bad_text_tokens"
        # one reduction: as uint16 a negative int16 id becomes ≥ 32768 ≥ K
        hi = int(img.view(np.uint16).max()) if img.dtype == np.int16 else int(img.max())
        if hi >= spec.num_classes or (img.dtype != np.int16 and int(img.min()) < 0):
            return None, "token_out_of_range"
        out = {"img": img, "txt": txt, "key": raw["__key__"], "captioned": captioned,
               "caption": raw.get(schema.CAPTION, b"").decode("utf-8", errors="replace")}
        if spec.with_embeddings:
            if not captioned:  # no text embedding either; zeros that the null text stands in for
                out["text_emb"] = np.zeros(spec.embed_dim, np.float16)
            for name, k in (("image_emb", schema.IMAGE_EMB), ("text_emb", schema.TEXT_EMB)):
                if name in out:
                    continue
                if k not in raw:
                    return None, "missing_embedding"
                e = schema.load_npy(raw[k])
                if e.shape != (spec.embed_dim,) or not np.isfinite(e).all():
                    return None, "bad_embedding"
                out[name] = e
        return out, ""
    except (ValueError, TypeError) as e:
        return None, f"undecodable:{type(e).__name__}"


def collate(spec: StreamSpec, items: list[dict], drop: np.ndarray, drop_image: Optional[np.ndarray] = None) -> dict:
    """List of decoded records → the batch dict of docs/architecture.md ("Batches")."""
    if spec.captions_optional:  # an image without a caption trains with the null text, whatever was drawn
        captioned = np.array([r["captioned"] for r in items])
        drop = drop | ~captioned
    batch = {
        "image_tokens": torch.from_numpy(np.stack([r["img"] for r in items]).astype(np.int64)),  # [B,h,w]
        "text_tokens": torch.from_numpy(np.stack([r["txt"] for r in items]).astype(np.int64)),  # [B,77]
        "drop_text": torch.from_numpy(drop),
        "caption": [r["caption"] for r in items],
        "key": [r["key"] for r in items],
    }
    if spec.with_embeddings:
        batch["image_emb"] = torch.from_numpy(np.stack([r["image_emb"] for r in items]).astype(np.float32))
        batch["text_emb"] = torch.from_numpy(np.stack([r["text_emb"] for r in items]).astype(np.float32))
    if spec.captions_optional:
        batch["captioned"] = torch.from_numpy(captioned)
    if drop_image is not None:
        batch["drop_image"] = torch.from_numpy(drop_image)
    return batch


def mixed_raw(spec: StreamSpec, stream: int, src_pos: list[int], errors: dict) -> Iterator[dict]:
    """Stage 1: weighted interleave of the sources' raw samples, each tagged with `_src_pos` after it."""
    counts_cache: dict = {}
    pos = list(src_pos)
    iters = [source_samples(spec, stream, k, pos[k], errors, counts_cache) for k in range(len(spec.sources))]
    mix = MixSchedule(spec, stream)
    while True:
        k = mix(sum(pos))
        raw = next(iters[k])
        pos[k] += 1
        raw["_src_pos"] = list(pos)
        yield raw


def decoded(spec: StreamSpec, stream: int, errors: dict):
    """Stage 2: decode/validate; invalid records are counted, warned about (rate-limited) and dropped."""
    watch = _Watch(spec, stream, errors)

    def stage(samples: Iterator[dict]) -> Iterator[dict]:
        for raw in samples:
            rec, reason = decode(spec, raw)
            if rec is None:
                watch.bad(reason, raw.get("__key__", "?"))
                continue
            watch.ok()
            rec["_src_pos"] = raw["_src_pos"]
            yield rec
    return stage


def batched(spec: StreamSpec, stream: int, epoch: int, first_batch: int, errors: dict):
    """Stage 3: fixed-size batches with seeded caption dropout, tagged `_pos` = (stream, epoch, batch, src_pos)."""
    def stage(records: Iterator[dict]) -> Iterator[dict]:
        b = first_batch
        while True:
            items = [r for _, r in zip(range(spec.batch_size), records)]
            if len(items) < spec.batch_size:
                return
            drop = _rng(spec.seed, spec.rank, stream, epoch, _DROP, b).random(spec.batch_size) < spec.caption_dropout
            drop_image = None if spec.image_dropout is None else (  # its own stream: independent of the text's
                _rng(spec.seed, spec.rank, stream, epoch, _DROP_IMAGE, b).random(spec.batch_size) < spec.image_dropout)
            b += 1
            batch = collate(spec, items, drop, drop_image)
            batch["_pos"] = (stream, epoch, b, items[-1]["_src_pos"])
            batch["_errors"] = {k: v for k, v in errors.items() if not k.startswith("_")}
            yield batch
    return stage


def epoch_pipeline(spec: StreamSpec, stream: int, start: Position, errors: dict):
    """The WebDataset pipeline of one stream's (rest of an) epoch, as an explicit list of stages."""
    import webdataset as wds

    src_pos = list(start.src_pos) or [0] * len(spec.sources)
    pipeline = [
        partial(mixed_raw, spec, stream, src_pos, errors),  # shard sequences, weighted mix
        decoded(spec, stream, errors),  # np.frombuffer records, validation, watchdog
        batched(spec, stream, start.epoch, start.batch, errors),  # collate inside the worker
        wds.slice(spec.batches_per_epoch - start.batch),  # same batch count on every rank and stream
    ]
    return wds.DataPipeline(*pipeline)


def stream_batches(spec: StreamSpec, stream: int, start: Position) -> Iterator[dict]:
    """Infinite batches of one stream from `start`, epoch after epoch; the raw samples continue across epochs."""
    errors: dict = {}
    pos = start
    while True:
        src_pos = list(pos.src_pos) or [0] * len(spec.sources)
        for batch in epoch_pipeline(spec, stream, pos, errors):
            src_pos = list(batch["_pos"][3])  # raw samples consumed up to this batch (nothing is read ahead)
            yield batch
        pos = Position(pos.epoch + 1, 0, src_pos)
