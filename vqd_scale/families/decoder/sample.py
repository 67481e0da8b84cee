"""The Corgi decoder as vqd-sample and its evaluator drive it: CLIP image embedding (+ caption) → image tokens."""
from __future__ import annotations

from typing import Optional

import torch

from vqd_scale.families.base import EMBEDDING_TO_TOKENS


class DecoderSampler:
    """The run's decoder (EMA weights) and, when it reads text, its text tower."""

    modes = frozenset({EMBEDDING_TO_TOKENS})

    def __init__(self, cfg, weights: dict, device, load_text):
        from vqd_scale.diffusion.discrete import MaskAndReplace
        from vqd_scale.interop.pipeline import with_num_classes
        from vqd_scale.models.decoder import ImageConditionedTransformer

        self.cfg = cfg
        cfg.model = with_num_classes(cfg.model, weights)
        self.model = ImageConditionedTransformer(cfg.model, cfg.decoder)
        self.model.load_state_dict(weights, strict=True)
        self.model.to(device).eval()
        self.text = load_text() if cfg.decoder.with_text else None
        self.diffusion = MaskAndReplace(cfg.diffusion, self.model.num_classes)
        self.num_classes, self.grid = self.model.num_classes, (cfg.model.height, cfg.model.width)
        self.embed_dim = cfg.decoder.embed_dim
        self.autocast = torch.bfloat16 if torch.device(device).type == "cuda" else None

    def tokens_from_embeddings(self, image_emb: torch.Tensor, text_tokens: Optional[torch.Tensor], sampler_cfg,
                               generator, guidance_drops: Optional[str] = None) -> torch.Tensor:
        from vqd_scale.generate import generate_from_embeddings
        return generate_from_embeddings(self.model, self.diffusion, image_emb, sampler_cfg, generator, self.text,
                                        text_tokens, guidance_drops or self.cfg.decoder.guidance_drops,
                                        autocast_dtype=self.autocast)
