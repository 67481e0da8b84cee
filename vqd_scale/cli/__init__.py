"""Thin entry points (vqd-train, vqd-extract, vqd-eval, vqd-sample, vqd-export) and what they share."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

from vqd_scale.errors import MissingInput, UserError


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


class _DropMessage(logging.Filter):
    """Drops log records whose message contains `needle`."""

    def __init__(self, needle: str):
        super().__init__()
        self.needle = needle

    def filter(self, record: logging.LogRecord) -> bool:
        return self.needle not in record.getMessage()


def text_encoder_for(text_cfg, config: Path, device: str = "cpu"):
    """The run's frozen text tower: `text.pretrained` weights, else the random-init tower training saved.

    Without `text.pretrained`, training draws the tower at random and writes it next to the run's
    config.yaml; a freshly drawn one would condition the model on different features, so it is refused.
    """
    from safetensors.torch import load_file

    from vqd_scale.models.text import FrozenCLIPTextEncoder
    from vqd_scale.rundir import TEXT_FILE
    if text_cfg.pretrained:
        return FrozenCLIPTextEncoder(text_cfg).to(device).eval()
    path = Path(config).parent / TEXT_FILE
    if not path.is_file():
        raise MissingInput(f"text.pretrained is unset and {path} is missing: the model was trained with a "
                                f"random-init text tower saved there; copy {TEXT_FILE} from the run directory "
                                "next to the config, or set text.pretrained")
    quiet = _DropMessage("No pretrained weights loaded")  # open_clip's "initialized randomly": not so here
    logging.getLogger().addFilter(quiet)
    try:
        text = FrozenCLIPTextEncoder(text_cfg)
    finally:
        logging.getLogger().removeFilter(quiet)
    text.load_state_dict(load_file(str(path)))
    return text.to(device).eval()
