"""VQ-Diffusion training task: frozen text features → q_sample → transformer → VLB + aux loss, importance-weighted."""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from vqd_scale.config import DiscreteDiffusionConfig, TextEncoderConfig, TransformerConfig
from vqd_scale.diffusion.discrete import ImportanceSampler, MaskAndReplace
from vqd_scale.models.flops import frozen_text_flops, vqd_flops
from vqd_scale.models.transformer import VQDiffusionTransformer, resolve_size


class TrainableVQD(VQDiffusionTransformer):
    """The transformer plus per-sample caption dropout to its learned null context.

    A subclass (not a wrapper) so the state dict is exactly the transformer's, and so the null context
    is used inside this module's forward, where ZeRO-3 has gathered it (a wrapper reading it outside
    the owning module's forward would see an empty partition).
    """

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, context: Optional[torch.Tensor] = None,
                context_kv=None, drop_text: Optional[torch.Tensor] = None) -> torch.Tensor:
        if context is not None:
            context = context.to(self.null_context.dtype)  # bf16 engine, fp32 text features
            if drop_text is not None:
                null = self.null_context.unsqueeze(0).expand_as(context)  # [B, L, Dc]
                context = torch.where(drop_text.view(-1, 1, 1), null, context)
        return super().forward(x_t, t, context=context, context_kv=context_kv)


class VQDTask:
    """Loss of one micro-batch and the cross-rank importance-sampler state."""

    gather_keys = ("t", "vlb_per_sample")

    def __init__(self, model_cfg: TransformerConfig, diffusion_cfg: DiscreteDiffusionConfig,
                 text_cfg: TextEncoderConfig, device: torch.device):
        from vqd_scale.models.text import FrozenCLIPTextEncoder

        self.device = device
        self.text = FrozenCLIPTextEncoder(text_cfg).to(device).eval()
        self.text.requires_grad_(False)
        self.module = TrainableVQD(model_cfg)
        self.model_config = {"model": dataclasses.asdict(model_cfg)}  # compared on resume (flattened keys)
        self.diffusion = MaskAndReplace(diffusion_cfg, model_cfg.num_classes).to(device)
        self.sampler = ImportanceSampler(diffusion_cfg.num_timesteps, diffusion_cfg)
        size = resolve_size(model_cfg)
        n = model_cfg.height * model_cfg.width
        self.tokens_per_sample = n
        self.flops = vqd_flops(size.layers, size.dim, size.mlp_ratio, n, model_cfg.context_len, model_cfg.context_dim,
                               model_cfg.num_classes, model_cfg.activation_checkpointing, frozen_text_flops(self.text))
        self.flops_per_sample = self.flops.model

    def loss(self, module, batch: dict, generator: torch.Generator) -> tuple[torch.Tensor, dict]:
        """Σ_t-VLB estimate (nats/token, importance-weighted) + aux loss over batch × tokens, plus metrics."""
        with torch.no_grad():
            context = self.text(batch["text_tokens"].to(self.device, non_blocking=True))  # [B,77,width]
        drop = batch["drop_text"].to(self.device, non_blocking=True).bool()
        return self.discrete_loss(batch, generator, lambda x_t, t: module(x_t, t, context=context, drop_text=drop))

    def discrete_loss(self, batch: dict, generator: torch.Generator, denoise) -> tuple[torch.Tensor, dict]:
        """The mask-and-replace loss of `denoise(x_t, t) -> log p̃(x̃_0)` on the batch's image tokens (shared
        with the decoder family, whose module differs only in its condition)."""
        x0 = batch["image_tokens"].to(self.device, non_blocking=True).long().flatten(1)  # [B,h,w] → [B,N]
        t, weight = self.sampler.sample(x0.shape[0], self.device, generator)
        x_t = self.diffusion.q_sample(x0, t, generator)
        log_x0 = denoise(x_t, t)
        parts = self.diffusion.losses(log_x0.float(), x0, x_t, t)
        # weight = 1/p_t: the loss estimates the whole VLB in nats per token (the official scale)
        loss = (parts["loss"] * weight).mean()
        metrics = {"loss": loss.detach(), "vlb": (parts["vlb"] * weight).detach().mean(),
                   "aux": parts["aux"].detach().mean(), "t": t, "vlb_per_sample": parts["vlb"].detach()}
        return loss, metrics

    def after_step(self, gathered: dict[str, torch.Tensor]) -> None:
        """Every rank folds in the same globally gathered (t, vlb), so sampler states stay identical."""
        self.sampler.update(gathered["t"], gathered["vlb_per_sample"])

    def state_dict(self) -> dict:
        return {"importance_sampler": self.sampler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state["importance_sampler"])
