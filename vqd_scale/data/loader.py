"""Streaming, resumable token-shard loader: one per rank, built from DataConfig + rank/world_size.

    loader = TokenLoader(cfg.data, rank, world_size, dropout={"text": 0.1})
    for batch in loader: ...            # infinite; batches as in docs/architecture.md ("Batches")
    state = loader.state_dict()         # exact position (per-worker stream positions)
    loader.load_state_dict(state)       # a rebuilt loader continues with the very next batch
    loader.seek(samples_seen)           # another world size: where this one is after that many samples

Each rank runs `num_workers` deterministic streams (one per DataLoader worker; torch hands out
their batches round-robin), each a function of (seed, rank, stream, position) — see data/stream.py.
Every rank yields the same number of batches per virtual epoch.
"""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Iterator, Mapping, Optional

import braceexpand
import torch

from vqd_scale.config import DataConfig
from vqd_scale.data import schema
from vqd_scale.data.stream import MixSchedule, Position, SourceSpec, StreamSpec, stream_batches
from vqd_scale.errors import MissingInput, UserError

log = logging.getLogger(__name__)
DROPOUT_KEYS = ("text", "image")  # conditions whose per-sample dropout the loader draws (`drop_<key>` in a batch)
STATE_VERSION = 2  # 2: stream positions count raw samples since the stream began (1: since the epoch began)
MARKERS_CHECKED = 16  # done-markers per source compared with the manifest (evenly spaced; each is one small read)


class _Streams(torch.utils.data.IterableDataset):
    """DataLoader worker i runs stream (i + rotation) mod W from its saved position."""

    def __init__(self, spec: StreamSpec, starts: list[Position], rotation: int):
        super().__init__()
        self.spec, self.starts, self.rotation = spec, starts, rotation

    def __iter__(self) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        wid = 0 if info is None else info.id
        stream = (wid + self.rotation) % self.spec.num_streams
        return stream_batches(self.spec, stream, self.starts[stream])


def _expand(pattern: str) -> list[str]:
    out: list[str] = []
    for part in pattern.split("::"):
        if part.strip():
            out.extend(braceexpand.braceexpand(part.strip()))
    return out


def _local(p: str) -> bool:
    return "://" not in p and not p.startswith("pipe:")


class TokenLoader:
    """Per-rank loader over weighted token-shard sources; infinite iterator with exact resume state."""

    def __init__(self, cfg: DataConfig, rank: int = 0, world_size: int = 1, dropout: Optional[Mapping[str, float]] = None,
                 timeout_s: Optional[float] = None, max_consecutive_failures: Optional[int] = None,
                 captions: str = "required"):
        if not 0 <= rank < world_size:
            raise UserError(f"rank {rank} not in [0, world_size={world_size})")
        dropout = dict(dropout or {})
        unknown = sorted(set(dropout) - set(DROPOUT_KEYS))
        if unknown or not all(0.0 <= p < 1.0 for p in dropout.values()):
            raise UserError(f"condition dropout {dropout}: keys must be among {DROPOUT_KEYS}, each in [0, 1)")
        caption_dropout = dropout.get("text", 0.0)
        if captions not in ("required", "optional"):
            raise ValueError(f"captions={captions!r}: 'required' or 'optional' (a family's DataNeeds.captions)")
        if cfg.batch_size <= 0 or cfg.num_workers < 0 or cfg.epoch_samples <= 0:
            raise UserError("data.batch_size and data.epoch_samples must be > 0, data.num_workers >= 0")
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self.timeout_s = cfg.timeout_s if timeout_s is None else timeout_s
        if max_consecutive_failures is None:
            max_consecutive_failures = cfg.max_consecutive_failures
        self.num_streams = max(1, cfg.num_workers)
        sources, manifests = [], []
        for sc in cfg.sources:
            shards, counts, manifest = self._resolve_source(sc.name, sc.shards)
            manifests.append(manifest)
            if not cfg.resampled and len(shards) < world_size * self.num_streams:
                raise UserError(f"source {sc.name!r} has {len(shards)} shards but world_size × num_workers = "
                                 f"{world_size * self.num_streams} streams need one each; set data.resampled=true "
                                 f"or use more shards")
            sources.append(SourceSpec(sc.name, shards, counts, float(sc.weight)))
        if not sources:
            raise UserError("data.sources is empty; list at least one token-shard source")
        if captions == "required":
            for sc, m in zip(cfg.sources, manifests):
                n, bare = (m.get("totals") or {}).get("written"), (m.get("totals") or {}).get("uncaptioned", 0)
                if n and bare >= n:
                    raise UserError(f"source {sc.name!r} holds only image-only records ({bare} uncaptioned, "
                                    "vqd-extract --keep-uncaptioned) but this model family trains on captions; "
                                    "drop it from data.sources (the decoder family reads it)")
        if any(s.weight <= 0 for s in sources):
            raise UserError("data.sources[].weight must be > 0")
        m0 = manifests[0]
        for sc, m in zip(cfg.sources, manifests):
            for k in ("tokenizer_id", "num_classes", "token_shape", "context_length"):
                if m.get(k) != m0.get(k):
                    raise UserError(f"source {sc.name!r} has {k}={m.get(k)} but source {cfg.sources[0].name!r} "
                                     f"has {m0.get(k)}; extract every source with the same tokenizer and resolution")
        named = schema.read_manifest(cfg.manifest).get("tokenizer_id") if cfg.manifest else m0.get("tokenizer_id")
        if named != m0.get("tokenizer_id"):  # training reads K from data.manifest: it must describe these shards
            raise UserError(f"data.manifest {cfg.manifest} has tokenizer {named!r} "
                             f"but the shards of source {cfg.sources[0].name!r} were extracted with "
                             f"{m0.get('tokenizer_id')!r}; point data.manifest at the manifest.json of these shards")
        if cfg.tokenizer_id is not None and m0["tokenizer_id"] != cfg.tokenizer_id:
            raise UserError(f"token shards were extracted with tokenizer {m0['tokenizer_id']!r} but "
                             f"data.tokenizer_id is {cfg.tokenizer_id!r}; re-extract the data with that tokenizer "
                             f"or set data.tokenizer_id={m0['tokenizer_id']}")
        if cfg.with_embeddings and not all(m.get("embed_dim") for m in manifests):
            raise UserError("data.with_embeddings=true but the manifest has no embed_dim; extract with "
                             "--clip-model to store CLIP embeddings")
        self.tokenizer_id: str = m0["tokenizer_id"]
        self.num_classes: int = int(m0["num_classes"])
        self.token_shape: tuple[int, int] = tuple(m0["token_shape"])
        self.embed_dim: Optional[int] = m0.get("embed_dim")
        # virtual epoch: epoch_samples over all ranks, rounded up to whole batches of every stream
        per_stream = math.ceil(cfg.epoch_samples / (world_size * self.num_streams * cfg.batch_size))
        self.batches_per_epoch = per_stream * self.num_streams  # per rank
        self.spec = StreamSpec(
            sources=sources, seed=cfg.seed, rank=rank, world_size=world_size, num_streams=self.num_streams,
            batch_size=cfg.batch_size, batches_per_epoch=per_stream, resampled=cfg.resampled,
            block=cfg.shuffle_buffer, token_shape=self.token_shape, num_classes=self.num_classes,
            context_length=int(m0.get("context_length", 77)), embed_dim=self.embed_dim,
            with_embeddings=cfg.with_embeddings, caption_dropout=caption_dropout,
            max_consecutive_failures=max_consecutive_failures, image_dropout=dropout.get("image"),
            captions_optional=captions == "optional")
        self._positions = [Position(0, 0, [0] * len(sources)) for _ in range(self.num_streams)]
        self._delivered = 0
        self.errors: dict[int, dict] = {}

    def _resolve_source(self, name: str, pattern: str) -> tuple[list[str], list[Optional[int]], dict]:
        """Expand a source's shards, drop missing/empty ones (warning), read its manifest and counts."""
        shards = _expand(pattern)
        if not shards:
            raise UserError(f"data source {name!r}: shard pattern {pattern!r} is empty; set data.sources[].shards "
                             f"to a braceexpand pattern like 'tokens/{{00000..00099}}.tar'")
        missing = [p for p in shards if _local(p) and not Path(p).exists()]
        if missing:
            log.warning("data source %r: %d of %d shards do not exist (e.g. %s); skipping them",
                        name, len(missing), len(shards), missing[0])
        shards = [p for p in shards if p not in set(missing)]
        if not shards:
            raise MissingInput(f"data source {name!r}: none of the shards of {pattern!r} exist; "
                                    f"fix data.sources[].shards")
        # a source's own manifest wins: data.manifest names one source's, and shard names (00000.tar)
        # repeat across sources, so its counts would be taken for another source's shards
        beside = Path(shards[0]).parent / schema.MANIFEST
        mpath = str(beside) if not self.cfg.manifest or (_local(shards[0]) and beside.exists()) else self.cfg.manifest
        manifest = schema.read_manifest(mpath)
        if not manifest.get("complete", True):
            log.warning("data source %r: manifest %s lists %d input shards not extracted yet; training on the "
                        "finished ones", name, mpath, len(manifest.get("pending_inputs", [])))
        self._check_markers(name, shards, mpath, manifest)
        known = {s["name"]: s["count"] for s in manifest.get("shards", [])}
        counts: list[Optional[int]] = []
        for p in shards:
            n = known.get(Path(p).name)
            marker = schema.done_marker_path(p)
            if n is None and _local(p) and marker.exists():
                n = json.loads(marker.read_text())["written"]
            counts.append(n)
        empty = [p for p, n in zip(shards, counts) if n == 0]
        if empty:
            log.warning("data source %r: %d shard(s) hold no valid sample (e.g. %s); skipping them", name,
                        len(empty), empty[0])
        kept = [(p, n) for p, n in zip(shards, counts) if n != 0]
        if not kept:
            raise UserError(f"data source {name!r}: every shard is empty (0 valid samples in the done-markers); "
                             f"re-run vqd-extract and check its skip counts")
        return [p for p, _ in kept], [n for _, n in kept], manifest

    @staticmethod
    def _check_markers(name: str, shards: list[str], mpath: str, manifest: dict) -> None:
        """Refuse a manifest that does not describe these shards: the done-markers vqd-extract wrote beside
        each shard name the tokenizer, K and token shape the shard was really extracted with."""
        local = [p for p in shards if _local(p)]
        step = max(1, len(local) // MARKERS_CHECKED)
        for p in local[::step][:MARKERS_CHECKED] + local[-1:]:
            marker = schema.done_marker_path(p)
            if not marker.exists():
                continue
            try:
                got = json.loads(marker.read_text())
            except (OSError, ValueError) as e:
                raise UserError(f"data source {name!r}: done-marker {marker} is unreadable ({e}); re-run "
                                 "vqd-extract for that shard") from None
            for k in ("tokenizer_id", "num_classes", "token_shape"):
                if k in got and manifest.get(k) is not None and got[k] != manifest[k]:
                    raise UserError(
                        f"data source {name!r}: manifest {mpath} says {k}={manifest[k]!r} but shard {p} was "
                        f"extracted with {k}={got[k]!r} (its done-marker {marker.name}); the manifest belongs "
                        "to other shards — rewrite it with vqd-extract (or fix data.sources / data.manifest)")

    def __iter__(self) -> Iterator[dict]:
        """Infinite batches from the current position (a fresh DataLoader each call)."""
        rotation = self._delivered % self.num_streams
        ds = _Streams(self.spec, list(self._positions), rotation)
        if self.cfg.num_workers == 0:
            it: Iterator[dict] = iter(ds)
        else:
            it = iter(torch.utils.data.DataLoader(ds, batch_size=None, num_workers=self.cfg.num_workers,
                                                  timeout=self.timeout_s, prefetch_factor=4,
                                                  persistent_workers=False))
        while True:
            try:
                batch = next(it)
            except RuntimeError as e:
                if "timed out" in str(e):
                    raise RuntimeError(
                        f"data loader rank {self.rank}: no batch within {self.timeout_s:.0f}s — the workers are "
                        f"stuck (unreachable shards or everything filtered out?); check data.sources") from e
                raise
            stream, epoch, b, src_pos = batch.pop("_pos")
            self.errors[stream] = batch.pop("_errors")
            self._positions[stream] = Position(epoch, b, list(src_pos))
            self._delivered += 1
            yield batch

    @property
    def epoch(self) -> int:
        """Virtual epoch of the next batch (the slowest stream's)."""
        nxt = self._positions[self._delivered % self.num_streams]
        return nxt.epoch + (nxt.batch >= self.spec.batches_per_epoch)

    def skipped(self) -> dict[str, int]:
        """Invalid samples skipped so far by reason, summed over this rank's streams."""
        out: dict[str, int] = {}
        for errs in self.errors.values():
            for k, v in errs.items():
                out[k] = out.get(k, 0) + v
        return out

    def state_dict(self) -> dict:
        """Exact position: per-stream (epoch, batch, raw samples per source) + batches delivered."""
        return {"version": STATE_VERSION, "seed": self.cfg.seed, "rank": self.rank, "world_size": self.world_size,
                "num_streams": self.num_streams, "sources": [s.name for s in self.spec.sources],
                "batches_per_epoch": self.batches_per_epoch, "delivered": self._delivered,
                "positions": [[p.epoch, p.batch, list(p.src_pos)] for p in self._positions]}

    def seek(self, samples_seen: int) -> None:
        """Start where this loader would be after `samples_seen` samples over all ranks (a resume on another
        world size, whose saved positions belong to other streams): the data goes on from there instead
        of replaying the start. Raw positions count every record as valid (exact for clean shards)."""
        per_rank = samples_seen // (self.world_size * self.cfg.batch_size)  # batches this rank would have had
        bpe, B = self.spec.batches_per_epoch, self.cfg.batch_size
        positions = []
        for stream in range(self.num_streams):
            n = per_rank // self.num_streams + (stream < per_rank % self.num_streams)  # round-robin over workers
            positions.append(Position(n // bpe, n % bpe, MixSchedule(self.spec, stream).counts(n * B)))
        self._positions, self._delivered = positions, per_rank

    def load_state_dict(self, state: dict) -> None:
        """Continue from a saved position; refuses a state that would silently revisit or skip data."""
        mine = self.state_dict()
        for k in ("version", "seed", "world_size", "num_streams", "sources", "batches_per_epoch"):
            if state.get(k) != mine[k]:
                raise UserError(f"data loader state has {k}={state.get(k)!r} but this loader has {mine[k]!r}; "
                                 f"resume with the same data config, world size and num_workers (or drop the "
                                 f"loader state to restart the data stream)")
        if state["rank"] != self.rank:
            raise UserError(f"data loader state belongs to rank {state['rank']}, not rank {self.rank}")
        self._delivered = int(state["delivered"])
        self._positions = [Position(int(e), int(b), [int(x) for x in sp]) for e, b, sp in state["positions"]]


def build_loader(cfg: DataConfig, rank: int = 0, world_size: int = 1,
                 dropout: Optional[Mapping[str, float]] = None, captions: str = "required") -> TokenLoader:
    """The training engine's entry point: one loader per rank; `dropout` = the family's condition dropout,
    `captions` its DataNeeds.captions (optional: image-only records are kept, with the null text)."""
    return TokenLoader(cfg, rank=rank, world_size=world_size, dropout=dropout, captions=captions)
