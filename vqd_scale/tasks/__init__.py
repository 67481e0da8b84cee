"""What one training step computes, per model family; `TASKS` maps `RunConfig.task` to a builder.

A task (see docs/architecture.md, Tasks) has:
- `module`: the trainable `nn.Module` handed to DeepSpeed (its state dict is what checkpoints,
  `ema.safetensors` and `load_weights` hold);
- `model_config`: a plain dict of the module's config, compared on resume to refuse another model size;
- `loss(module, batch, generator) -> (loss scalar, metrics)`; `module` is the DeepSpeed engine (call it
  like the module). Metrics are tensors: 0-dim ones are logged (averaged over ranks); the per-sample
  ones named in `gather_keys` are all-gathered (rank order) and handed to `after_step(gathered)`;
- `tokens_per_sample` (for tokens/s), `flops` (`train.flops.StepFlops`: MFU/HFU) and `flops_per_sample`
  (= flops.model);
- `state_dict()` / `load_state_dict()` for cross-rank state such as the importance sampler.
Builders take the RunConfig sections they need and the device; frozen parts (text encoder) stay
outside the DeepSpeed engine.
"""
from __future__ import annotations

from typing import Callable


def _build_vqd(cfg, device):
    from vqd_scale.tasks.vqd import build
    return build(cfg, device)


def _build_prior(cfg, device):
    from vqd_scale.tasks.prior import build
    return build(cfg, device)


# Explicit registry; the imports are deferred so a task's dependencies load only when it is used.
TASKS: dict[str, Callable] = {"vqd": _build_vqd, "prior": _build_prior}


def build_task(cfg, device):
    """The task named by `cfg.task` (a RunConfig)."""
    if cfg.task not in TASKS:
        raise ValueError(f"task={cfg.task!r} unknown; use one of {sorted(TASKS)}")
    return TASKS[cfg.task](cfg, device)
