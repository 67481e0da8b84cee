"""DeepSpeed engine from our typed configs: ZeRO stage, precision, accumulation, clipping, AdamW.

The learning rate is not a DeepSpeed scheduler: `lr_schedule.lr_at(samples_seen)` is written into the
param groups before every optimizer step, so the schedule is a function of samples seen only.
With bf16/fp16 the module holds 16-bit weights and the optimizer the fp32 master copy (partitioned
under ZeRO 1-3); `fp32_master` / `set_fp32_master` read and write that copy (EMA, resume).
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from torch import nn

from vqd_scale.config import DeepSpeedConfig, OptimConfig
from vqd_scale.errors import UserError

FP16_LOSS_SCALING = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 1000,
                     "hysteresis": 2, "min_loss_scale": 1}  # loss_scale 0 = dynamic


def native_bf16(device: torch.device) -> bool:
    """Whether this GPU computes bf16 natively (compute capability >= 8.0), not by emulation."""
    return device.type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False)


def choose_precision(requested: str, device_type: str, has_native_bf16: bool) -> tuple[str, str]:
    """(precision, why) for `deepspeed.precision`; refuses what would run emulated or not at all."""
    gpu = device_type == "cuda"
    if requested == "auto":
        if not gpu:
            return "fp32", "auto on CPU"
        if has_native_bf16:
            return "bf16", "auto: this GPU has native bf16"
        return "fp16", ("auto: this GPU has no native bf16 (compute capability < 8.0, bf16 would be emulated): "
                        "fp16 with dynamic loss scaling")
    if requested == "bf16" and gpu and not has_native_bf16:
        raise UserError("deepspeed.precision=bf16 but this GPU has no native bf16 (compute capability < 8.0; it "
                         "would be emulated, slower than fp16); use precision=auto (fp16 with loss scaling) or fp32")
    if requested == "fp16" and not gpu:
        raise UserError("deepspeed.precision=fp16 needs a GPU; use precision=auto (fp32) or bf16 on CPU")
    return requested, "as configured"


def resolve_precision(cfg: DeepSpeedConfig, device: torch.device) -> str:
    """The precision this run trains in on `device` (see `choose_precision`)."""
    return choose_precision(cfg.precision, device.type, native_bf16(device))[0]


def ds_config(cfg: DeepSpeedConfig, optim: OptimConfig, micro_batch: int, world_size: int,
              precision: str, device_type: str = "cpu") -> dict[str, Any]:
    """The DeepSpeed JSON config for this run."""
    b = int(cfg.bucket_elements)
    low = precision in ("bf16", "fp16")
    zero: dict[str, Any] = {"stage": cfg.zero_stage, "reduce_bucket_size": b, "allgather_bucket_size": b}
    if cfg.zero_stage == 3:
        zero.update(stage3_prefetch_bucket_size=b, stage3_max_live_parameters=2 * b, stage3_max_reuse_distance=2 * b)
    if cfg.zero_stage >= 1:
        # Reduce gradient buckets on a side stream while the backward goes on (CUDA streams; the CPU
        # accelerator has none, and gloo gains nothing from it).
        zero["overlap_comm"] = device_type == "cuda"
    if cfg.zero_stage >= 2:
        zero["contiguous_gradients"] = True
    if cfg.offload_optimizer:
        if cfg.zero_stage == 0:
            raise UserError("deepspeed.offload_optimizer needs deepspeed.zero_stage >= 1")
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    conf = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": cfg.grad_accum,
        "train_batch_size": micro_batch * cfg.grad_accum * world_size,
        "gradient_clipping": optim.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": precision == "bf16"},
        "fp16": FP16_LOSS_SCALING if precision == "fp16" else {"enabled": False},
        # A client AdamW (below) works the same on CPU and GPU; DeepSpeed's fused Adam would JIT-compile.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if low and cfg.grad_accum > 1:
        # Summing micro-step gradients in bf16 drops the small ones. ZeRO 2/3 accumulate in fp32 on request;
        # stage 0's 16-bit DDP path cannot, and stage 1 would switch to DeepSpeed's BF16_Optimizer, whose
        # checkpoints zero_to_fp32 cannot consolidate (export, resume on another world size).
        if cfg.zero_stage < 2:
            raise UserError(f"deepspeed.grad_accum={cfg.grad_accum} with precision {precision} needs "
                             f"deepspeed.zero_stage 2 or 3 (stage {cfg.zero_stage} cannot accumulate gradients in "
                             "fp32 with consolidatable checkpoints); or grad_accum=1")
        conf["data_types"] = {"grad_accum_dtype": "fp32"}
    if low and cfg.communication_dtype == "fp32":
        conf["communication_data_type"] = "fp32"
    return conf


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
    import torch.distributed as dist

    precision, why = choose_precision(cfg.precision, device.type, native_bf16(device))
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(f"precision: {precision} ({why})", flush=True)
    conf = ds_config(cfg, optim, micro_batch, world_size, precision, device.type)
    groups = param_groups(module, optim.weight_decay)
    if cfg.offload_optimizer:
        from deepspeed.ops.adam import DeepSpeedCPUAdam
        opt = DeepSpeedCPUAdam(groups, lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps, adamw_mode=True)
    else:
        opt = torch.optim.AdamW(groups, lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps)
    engine, _, _, _ = deepspeed.initialize(model=module, optimizer=opt, config=conf)
    return engine, precision


def _stage0_masters(engine) -> dict[int, torch.Tensor]:
    """id(module param) → its fp32 copy in DeepSpeed's ZeRO-0 16-bit optimizer (FP16_UnfusedOptimizer)."""
    opt = engine.optimizer
    return {id(lp): hp for lps, hps in zip(opt.fp16_groups, opt.fp32_groups) for lp, hp in zip(lps, hps)}


def fp32_master(engine) -> Optional[Callable[[nn.Parameter], torch.Tensor]]:
    """A reader of one parameter's full fp32 master value; None when the module's weights are fp32 already.

    Under ZeRO 1-3 the read is a collective (all-reduce / all-gather of the partitions): every rank
    must call it for the same parameters in the same order.
    """
    if not (engine.bfloat16_enabled() or engine.fp16_enabled()):
        return None
    if not engine.zero_optimization():
        table = _stage0_masters(engine)
        return lambda p: table[id(p)].detach()
    from deepspeed.utils import safe_get_full_fp32_param

    def read(p: nn.Parameter) -> torch.Tensor:
        v = safe_get_full_fp32_param(p)
        if v is None:
            raise RuntimeError(f"no fp32 master copy for a parameter of shape {tuple(p.shape)} "
                               f"({type(engine.optimizer).__name__})")
        return v
    return read


@torch.no_grad()
def set_fp32_master(engine, state: dict[str, torch.Tensor]) -> None:
    """Overwrite the fp32 master weights with full fp32 values by parameter name (no-op in fp32 runs).

    The module was loaded from the same values before `build_engine`, so its 16-bit weights already
    agree; DeepSpeed built the master copy from those 16-bit weights, which lost the low bits.
    """
    if fp32_master(engine) is None:
        return
    from deepspeed.utils import safe_set_full_fp32_param

    table = None if engine.zero_optimization() else _stage0_masters(engine)
    for name, p in engine.module.named_parameters():
        value = state[name].to(device=engine.device, dtype=torch.float32)
        if table is not None:
            table[id(p)].copy_(value)
        else:
            safe_set_full_fp32_param(p, value)
