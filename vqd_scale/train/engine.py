"""DeepSpeed engine from our typed configs: ZeRO stage, precision, accumulation, clipping, AdamW.

The learning rate is not a DeepSpeed scheduler: `lr_schedule.lr_at(samples_seen)` is written into the
param groups before every optimizer step, so the schedule is a function of samples seen only.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from vqd_scale.config import DeepSpeedConfig, OptimConfig


def resolve_precision(cfg: DeepSpeedConfig, device: torch.device) -> str:
    """`auto` → bf16 on GPU, fp32 on CPU; bf16 asked for on CPU is refused (gloo + CPU bf16 is slow and untested)."""
    if cfg.precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    if cfg.precision == "bf16" and device.type != "cuda":
        raise ValueError("deepspeed.precision=bf16 needs a GPU; use precision=auto or fp32 on CPU")
    return cfg.precision


def ds_config(cfg: DeepSpeedConfig, optim: OptimConfig, micro_batch: int, world_size: int,
              precision: str) -> dict[str, Any]:
    """The DeepSpeed JSON config for this run."""
    b = int(cfg.bucket_elements)
    zero: dict[str, Any] = {"stage": cfg.zero_stage, "reduce_bucket_size": b, "allgather_bucket_size": b}
    if cfg.zero_stage == 3:
        zero.update(stage3_prefetch_bucket_size=b, stage3_max_live_parameters=2 * b, stage3_max_reuse_distance=2 * b)
    if cfg.zero_stage >= 2:
        zero.update(overlap_comm=False, contiguous_gradients=True)
    if cfg.offload_optimizer:
        if cfg.zero_stage == 0:
            raise ValueError("deepspeed.offload_optimizer needs deepspeed.zero_stage >= 1")
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    return {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": cfg.grad_accum,
        "train_batch_size": micro_batch * cfg.grad_accum * world_size,
        "gradient_clipping": optim.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": False},
        # A client AdamW (below) works the same on CPU and GPU; DeepSpeed's fused Adam would JIT-compile.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def param_groups(module: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: decay weight matrices; no decay for biases, norms, embedding tables, null context."""
    # Embedding tables and the learned null text are lookups: decay would shrink rarely used rows.
    no_decay_types = (nn.Embedding, nn.LayerNorm, nn.GroupNorm)
    decay, no_decay = [], []
    for mod in module.modules():
        for name, p in mod.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            skip = isinstance(mod, no_decay_types) or p.dim() < 2 or name == "null_context"
            (no_decay if skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def build_engine(module: nn.Module, cfg: DeepSpeedConfig, optim: OptimConfig, micro_batch: int,
                 world_size: int, device: torch.device):
    """(engine, precision): `deepspeed.initialize` with a torch AdamW client optimizer."""
    import deepspeed

    precision = resolve_precision(cfg, device)
    conf = ds_config(cfg, optim, micro_batch, world_size, precision)
    groups = param_groups(module, optim.weight_decay)
    if cfg.offload_optimizer:
        from deepspeed.ops.adam import DeepSpeedCPUAdam
        opt = DeepSpeedCPUAdam(groups, lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps, adamw_mode=True)
    else:
        opt = torch.optim.AdamW(groups, lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps)
    engine, _, _, _ = deepspeed.initialize(model=module, optimizer=opt, config=conf)
    return engine, precision
