"""Thin entry points (vqd-train, vqd-extract, vqd-eval, vqd-sample, vqd-export) and what they share."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from vqd_scale.errors import UserError


def weights_and_config(checkpoint: Optional[str], weights: Optional[str], config: Optional[str],
                       which: str = "ema") -> tuple[dict, Path]:
    """(state dict, config path) from `--checkpoint` or `--weights` + `--config`; refuses other mixes."""
    from safetensors.torch import load_file

    if bool(checkpoint) == bool(weights):
        raise UserError("give exactly one of --checkpoint or --weights")
    if checkpoint:
        from vqd_scale.rundir import load_weights
        sd = load_weights(checkpoint, which=which)  # refuses incomplete checkpoints
        return sd, Path(config) if config else Path(checkpoint).resolve().parents[1] / "config.yaml"
    if not config:
        raise UserError("--weights needs --config (the run's config.yaml)")
    return load_file(weights), Path(config)


def text_encoder_for(text_cfg, config: Path, device: str = "cpu"):
    """The run's frozen text tower (`rundir.load_text_tower`): pretrained weights or the saved random-init one."""
    from vqd_scale.rundir import load_text_tower
    return load_text_tower(text_cfg, Path(config).parent, device)
