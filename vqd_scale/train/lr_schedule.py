"""Learning rate as a function of samples seen, so the schedule does not depend on the GPU count.

The official code steps a plateau scheduler every iteration on the training loss, which makes the
schedule change with the number of GPUs (a reproduction complaint); here lr depends only on how many
samples were consumed: linear warm-up over `warmup_samples`, then cosine/linear decay to
`min_lr_ratio·lr` at `total_samples`, or constant. Stateless: resume only needs `samples_seen`.
"""
from __future__ import annotations

import math

from vqd_scale.config import OptimConfig
from vqd_scale.errors import UserError


def lr_at(samples_seen: int, cfg: OptimConfig, total_samples: int) -> float:
    """Learning rate after `samples_seen` samples (over all ranks)."""
    if cfg.warmup_samples > 0 and samples_seen < cfg.warmup_samples:
        # +1 so the very first step does not run at lr = 0 (a wasted step).
        return cfg.lr * min(1.0, (samples_seen + 1) / cfg.warmup_samples)
    if cfg.decay == "constant":
        return cfg.lr
    span = max(total_samples - cfg.warmup_samples, 1)
    frac = min(max(samples_seen - cfg.warmup_samples, 0) / span, 1.0)
    floor = cfg.lr * cfg.min_lr_ratio
    if cfg.decay == "linear":
        return floor + (cfg.lr - floor) * (1.0 - frac)
    if cfg.decay == "cosine":
        return floor + (cfg.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * frac))
    raise UserError(f"optim.decay={cfg.decay!r} unknown; use cosine, constant or linear")


def set_lr(optimizer, lr: float) -> None:
    """Write lr into every param group (keeps per-group scales in `lr_scale`, if any)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
