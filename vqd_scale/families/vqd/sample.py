"""VQ-Diffusion as vqd-sample drives it: caption tokens → image tokens."""
from __future__ import annotations

import torch

from vqd_scale.families.base import TEXT_TO_TOKENS


class VQDSampler:
    """The run's transformer (EMA weights) and text tower, ready to sample."""

    modes = frozenset({TEXT_TO_TOKENS})

    def __init__(self, cfg, weights: dict, device, load_text):
        from vqd_scale.diffusion.discrete import MaskAndReplace
        from vqd_scale.interop.pipeline import with_num_classes
        from vqd_scale.models.transformer import VQDiffusionTransformer

        self.cfg = cfg
        cfg.model = with_num_classes(cfg.model, weights)
        self.model = VQDiffusionTransformer(cfg.model)
        self.model.load_state_dict(weights, strict=True)
        self.model.to(device).eval()
        self.text = load_text()
        self.diffusion = MaskAndReplace(cfg.diffusion, self.model.num_classes)
        self.num_classes, self.grid = self.model.num_classes, (cfg.model.height, cfg.model.width)
        self.autocast = torch.bfloat16 if torch.device(device).type == "cuda" else None

    def tokens_from_text(self, text_tokens: torch.Tensor, sampler_cfg, generator) -> torch.Tensor:
        from vqd_scale.generate import generate
        return generate(self.model, self.text, self.diffusion, text_tokens, sampler_cfg, generator,
                        autocast_dtype=self.autocast)
