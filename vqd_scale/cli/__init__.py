"""Thin entry points (vqd-train, vqd-extract, vqd-eval, vqd-sample, vqd-export) and what they share."""
from __future__ import annotations

from pathlib import Path
from typing import Optional


def weights_and_config(checkpoint: Optional[str], weights: Optional[str], config: Optional[str],
                       which: str = "ema") -> tuple[dict, Path]:
    """(state dict, config path) from `--checkpoint` or `--weights` + `--config`; refuses other mixes."""
    from safetensors.torch import load_file

    if bool(checkpoint) == bool(weights):
        raise ValueError("give exactly one of --checkpoint or --weights")
    if checkpoint:
        from vqd_scale.train.checkpoint import load_weights
        sd = load_weights(checkpoint, which=which)  # refuses incomplete checkpoints
        return sd, Path(config) if config else Path(checkpoint).resolve().parents[1] / "config.yaml"
    if not config:
        raise ValueError("--weights needs --config (the run's config.yaml)")
    return load_file(weights), Path(config)
