"""EMA of the trainable weights that works under every ZeRO stage.

Design: rank 0 alone keeps a full fp32 copy (4Ψ bytes on one rank; the other ranks keep nothing),
updated every `ema_every` steps (the official recipe: decay 0.99 every 25 iterations). Under ZeRO-3
each rank only holds a shard, so the update gathers the full parameters with
`deepspeed.zero.GatheredParameters` — a collective, hence every rank calls `update` — one chunk of
parameters at a time so the gather never materialises much more than `chunk_numel` extra elements.
Under ZeRO 0–2 every rank already holds full parameters and no communication happens.

The gather must leave ZeRO-3's parameter state exactly as it found it. `GatheredParameters` partitions
on exit every parameter it was handed, including the small *persistent* ones ZeRO-3 keeps resident
(`ds_persist`) and expects to find resident: a weight read directly in another module's forward
(`self.row_emb.weight`) that is partitioned at that moment is registered as an external parameter of
that module on the fly, so the module's parameter set changes under an already recorded prefetch trace
and the next backward dies with "tracing error ... expected the next N parameters in the parameter
fetch queue". A fresh run hid this (the EMA's first gather ran before the trace was recorded);
`load_checkpoint` re-gathers the persistent parameters, so every resumed run hit it. Hence only
parameters that are not already available are gathered (and so partitioned again) here. Sharding the
EMA like ZeRO-3 shards the weights would save 4Ψ on rank 0 but needs a consolidation pass for every
`ema.safetensors`; a full copy on rank 0 writes it directly.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Optional

import torch
from torch import nn


def _is_zero3(p: nn.Parameter) -> bool:
    return hasattr(p, "ds_id")  # DeepSpeed ZeRO-3 tags partitioned parameters


def _available(p: nn.Parameter) -> bool:
    """A ZeRO-3 parameter whose full data is resident now (persistent, or still in use)."""
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus
    return p.ds_status == ZeroParamStatus.AVAILABLE


def gathered_chunks(module: nn.Module, chunk_numel: int = 50_000_000) -> Iterator[list[tuple[str, nn.Parameter]]]:
    """Yield (name, full param) lists; under ZeRO-3 each list is gathered for the duration of its turn."""
    named = [(n, p) for n, p in module.named_parameters()]
    chunk: list[tuple[str, nn.Parameter]] = []
    size = 0
    for item in named + [None]:  # None flushes the last chunk
        if item is not None:
            n, p = item
            chunk.append(item)
            size += p.ds_numel if _is_zero3(p) else p.numel()
        if chunk and (item is None or size >= chunk_numel):
            absent = [p for _, p in chunk if _is_zero3(p) and not _available(p)]
            if absent:
                import deepspeed
                ctx = deepspeed.zero.GatheredParameters(absent, modifier_rank=None)
            else:
                ctx = contextlib.nullcontext()
            with ctx:
                yield chunk
            chunk, size = [], 0


Reader = Callable[[nn.Parameter], torch.Tensor]


def _full_weights(module: nn.Module, read: Optional[Reader]) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, full weight) per parameter: `read(param)` when given (it does its own communication),
    else the module's parameters themselves (gathered chunk by chunk under ZeRO-3)."""
    if read is not None:
        for n, p in module.named_parameters():
            yield n, read(p)
        return
    for chunk in gathered_chunks(module):
        for n, p in chunk:
            yield n, p.detach()


class EMA:
    """fp32 exponential moving average of a module's parameters, held on rank 0."""

    def __init__(self, decay: float, every: int, keep: bool):
        self.decay = decay
        self.every = every
        self.keep = keep  # False on ranks other than 0: they only take part in the gathers
        self.shadow: Optional[dict[str, torch.Tensor]] = None
        self.updates = 0

    @torch.no_grad()
    def init_from(self, module: nn.Module, read: Optional[Reader] = None) -> None:
        """Start the average at the current weights (collective under ZeRO-3, or with a collective `read`)."""
        shadow = {}
        for n, w in _full_weights(module, read):
            if self.keep:
                shadow[n] = w.float().clone()
        self.shadow = shadow if self.keep else None

    @torch.no_grad()
    def maybe_update(self, module: nn.Module, step: int, read: Optional[Reader] = None) -> bool:
        """Fold the weights in when `step % every == 0`; every rank must call this (ZeRO-3 gathers).

        `read(param)` gives the full fp32 master value of a parameter (`engine.fp32_master`): with
        bf16/fp16 training the module's own weights are rounded copies, and averaging those would
        lose every update smaller than their last bit.
        """
        if step % self.every != 0:
            return False
        for n, w in _full_weights(module, read):
            if self.keep:
                self.shadow[n].lerp_(w.float(), 1.0 - self.decay)  # s ← d·s + (1−d)·w
        self.updates += 1
        return True

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The averaged weights (CPU fp32), rank 0 only."""
        if not self.keep or self.shadow is None:
            raise RuntimeError("EMA weights live on rank 0 only")
        return {n: t.detach().cpu().contiguous() for n, t in self.shadow.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor], device: torch.device) -> None:
        """Restore averaged weights; names and shapes must match the module's."""
        if not self.keep:
            return
        if self.shadow is not None:
            missing = set(self.shadow) - set(state)
            extra = set(state) - set(self.shadow)
            if missing or extra:
                raise ValueError(f"EMA state does not match the model: missing {sorted(missing)[:3]}, "
                                 f"unexpected {sorted(extra)[:3]}")
            for n, t in state.items():
                if t.shape != self.shadow[n].shape:
                    raise ValueError(f"EMA tensor {n} has shape {tuple(t.shape)}, model has "
                                     f"{tuple(self.shadow[n].shape)}")
        self.shadow = {n: t.to(device=device, dtype=torch.float32).clone() for n, t in state.items()}
