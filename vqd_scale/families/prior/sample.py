"""The shifted prior as vqd-sample and the decoder's chain evaluation drive it: caption → CLIP image embedding."""
from __future__ import annotations

import dataclasses

import torch

from vqd_scale.families.base import TEXT_TO_EMBEDDING


class PriorSampler:
    """The run's prior (EMA weights, its mixture included) and text tower; sampling settings from cfg.shifted."""

    modes = frozenset({TEXT_TO_EMBEDDING})

    def __init__(self, cfg, weights: dict, device, load_text):
        from vqd_scale.diffusion.shifted import ShiftedGaussianDiffusion
        from vqd_scale.models.prior import PriorModel

        self.cfg, self.device = cfg, torch.device(device)
        s = cfg.shifted
        self.model = PriorModel(cfg.prior, s.learnable_mixture, s.mixture_lr_scale)
        # strict: the fitted mixture (means, stds) travels in the weights, not in shifted.clusters
        self.model.load_state_dict(weights, strict=True)
        self.model.to(self.device).eval()
        self.text = load_text()
        self.diffusion = ShiftedGaussianDiffusion(dataclasses.replace(s, clusters=None)).to(self.device)
        self.embed_dim = cfg.prior.embed_dim

    @torch.no_grad()
    def embeddings_from_text(self, text_tokens: torch.Tensor, text_emb: torch.Tensor, generator,
                             steps: int | None = None) -> torch.Tensor:
        """Unit-norm image embeddings F[B,E] for caption tokens and their CLIP text embeddings (the extraction
        CLIP's, as in training): component chosen from the text, shifted sampling, shifted.sample_steps."""
        from vqd_scale.families.prior.task import sample_embeddings

        s = self.cfg.shifted
        context = self.text(text_tokens.to(self.device))
        return sample_embeddings(self.model, self.diffusion, text_emb.to(self.device).float(), context,
                                 steps or s.sample_steps, generator, s.guidance_scale, s.clamp_x0)
