"""Shifted-diffusion prior training task: text → CLIP image embedding (Corgi), and embedding sampling.

Frozen text tower gives the per-token context (and the text embedding when the batch has none);
the component is chosen per pair from the mixture; z_t ~ q(z_t | z_0) around it; the prior predicts
ẑ_0; loss = P2-weighted MSE in z space (+ the P2-weighted mixture losses when the mixture is learnable).
z = s·e/‖e‖ (`models.prior.prior_scale`, √E by default): the stored unit-norm CLIP embeddings go in,
sampled embeddings come back on the unit sphere.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from vqd_scale.config import PriorConfig, ShiftedDiffusionConfig, TextEncoderConfig
from vqd_scale.data.clusters import load_clusters
from vqd_scale.diffusion.shifted import ShiftedGaussianDiffusion
from vqd_scale.errors import UserError
from vqd_scale.families.base import batch_image_emb
from vqd_scale.models.flops import frozen_text_flops, prior_flops
from vqd_scale.models.prior import PriorModel, resolve_prior_size


class TrainablePrior(PriorModel):
    """The prior whose forward is one whole training step's loss.

    A subclass (not a wrapper) so the state dict is exactly `PriorModel`'s; and the mixture is read
    inside this forward, where ZeRO-3 has gathered its parameters.
    """

    def __init__(self, cfg: PriorConfig, shifted: ShiftedDiffusionConfig):
        super().__init__(cfg, shifted.learnable_mixture, shifted.mixture_lr_scale)
        self.shifted_cfg = shifted
        self.diffusion = ShiftedGaussianDiffusion(shifted)  # plain tensors, not a module: moved in forward

    def forward(self, z0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, text_emb: torch.Tensor,
                context: torch.Tensor, drop_text: torch.Tensor, aux_noise: Optional[torch.Tensor] = None
                ) -> tuple[torch.Tensor, dict]:
        """(loss, metrics) for stored embeddings z0, text_emb [B,E] at t [B] with noise ε [B,E] (prior space);
        aux_noise [D,B,E] for a learnable mixture."""
        if self.diffusion.betas.device != z0.device:
            self.diffusion.to(z0.device)
        z0, text_emb = self.to_prior_space(z0), self.to_prior_space(text_emb)
        c, mu, sigma, aux = self.mixture(text_emb, z0=z0, kappa=self.shifted_cfg.kappa, aux_noise=aux_noise,
                                         weight=self.diffusion.weight(t))
        mu, scale = self.diffusion.frame(mu, sigma, z0)
        # z_t carries no gradient to the mixture (the release detaches q_sample): else the MSE would shrink σ_c
        # (less noise is easier to denoise) and the learnable mixture would collapse its stds
        z_t = self.diffusion.q_sample(z0, t, mu.detach(), scale.detach(), noise)
        pred = self.denoise(z_t, t, text_emb, c, context, drop_text)
        mse = self.diffusion.loss(pred, z0, t)
        loss = mse.mean() + sum(aux.values(), torch.zeros((), device=z0.device))
        metrics = {"loss": loss.detach(), "mse": mse.detach().mean(),
                   "cos_x0": torch.nn.functional.cosine_similarity(pred.float(), z0.float(), dim=-1).detach().mean()}
        metrics.update({k: v.detach() for k, v in aux.items()})
        return loss, metrics


class PriorTask:
    """Loss of one micro-batch of (text tokens, CLIP image embedding[, text embedding]) pairs."""

    gather_keys: tuple[str, ...] = ()

    def __init__(self, prior_cfg: PriorConfig, shifted_cfg: ShiftedDiffusionConfig, text_cfg: TextEncoderConfig,
                 device: torch.device, text_encoder=None):
        from vqd_scale.models.text import FrozenCLIPTextEncoder

        if shifted_cfg.shifted and shifted_cfg.clusters is None:
            raise UserError("shifted.shifted=true needs shifted.clusters (a .safetensors from "
                             "tools/fit_prior_clusters.py); or set shifted.shifted=false for the plain-DDPM baseline")
        self.device, self.cfg, self.shifted_cfg = device, prior_cfg, shifted_cfg
        self.text = (text_encoder or FrozenCLIPTextEncoder(text_cfg)).to(device).eval().requires_grad_(False)
        if self.text.width != prior_cfg.context_dim:
            raise UserError(f"prior.context_dim={prior_cfg.context_dim} but the text tower's width is "
                             f"{self.text.width}; set prior.context_dim={self.text.width}")
        self.module = TrainablePrior(prior_cfg, shifted_cfg)
        if shifted_cfg.clusters is not None:
            cl = load_clusters(shifted_cfg.clusters)
            self.module.load_clusters(cl["means"], cl["stds"])
        self.model_config = {"prior": dataclasses.asdict(prior_cfg),
                             "learnable_mixture": shifted_cfg.learnable_mixture}
        self.diffusion = ShiftedGaussianDiffusion(shifted_cfg).to(device)
        size = resolve_prior_size(prior_cfg)
        self.tokens_per_sample = 1
        self.flops = prior_flops(size.layers, size.dim, prior_cfg.context_len, prior_cfg.context_dim,
                                 prior_cfg.embed_dim, prior_cfg.num_components, prior_cfg.activation_checkpointing,
                                 frozen_text_flops(self.text))
        self.flops_per_sample = self.flops.model

    def text_inputs(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(context [B,L,W], text embedding [B,E]) from the frozen tower; the batch's text_emb if stored."""
        tokens = batch["text_tokens"].to(self.device, non_blocking=True).long()
        with torch.no_grad():
            context = self.text(tokens)
            text_emb = batch.get("text_emb")
            text_emb = self.text.embed(tokens) if text_emb is None else text_emb.to(self.device).float()
        return context, text_emb

    def loss(self, module, batch: dict, generator: torch.Generator) -> tuple[torch.Tensor, dict]:
        """Mean P2-weighted z_0 MSE (+ mixture losses) over the batch, plus metrics."""
        z0 = batch_image_emb(batch, self.device, self.cfg.embed_dim, "prior", "prior.embed_dim",
                             "set data.with_embeddings=true and extract the shards with --clip-model")
        context, text_emb = self.text_inputs(batch)
        B = z0.shape[0]
        t = self.diffusion.sample_t(B, self.device, generator)
        noise = torch.randn(z0.shape, generator=generator, device=self.device)
        # CFG dropout: the loader already drew it at shifted.text_dropout (train/loop.py), so drawing again
        # here would drop 1 − (1 − p)² of the captions; only a batch without drop_text gets its own draw
        if "drop_text" in batch:
            drop = batch["drop_text"].to(self.device).bool()
        else:
            drop = torch.rand(B, generator=generator, device=self.device) < self.shifted_cfg.text_dropout
        aux_noise = None
        if self.shifted_cfg.learnable_mixture:
            aux_noise = torch.randn((self.shifted_cfg.num_aux_draws, *z0.shape), generator=generator, device=self.device)
        return module(z0, t, noise, text_emb, context, drop, aux_noise)

    def after_step(self, gathered: dict) -> None:
        """No cross-rank state (uniform t)."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


@torch.no_grad()
def sample_embeddings(model: PriorModel, diffusion: ShiftedGaussianDiffusion, text_emb: torch.Tensor,
                      context: Optional[torch.Tensor], steps: int, generator: Optional[torch.Generator] = None,
                      guidance_scale: float = 1.0, clamp_x0: bool = False) -> torch.Tensor:
    """Generated image embeddings [B,E] on the unit sphere (the stored embeddings' space) for stored text
    embeddings [B,E]: z_T = μ_c + κσ_c ε, `steps` respaced ancestral steps, CFG via zeroed context."""
    text_emb = model.to_prior_space(text_emb)
    c, mu, sigma, _ = model.mixture(text_emb)
    mu_s, scale = diffusion.frame(mu, sigma, text_emb.float())
    bounds = (mu - 3 * sigma, mu + 3 * sigma) if clamp_x0 and diffusion.cfg.shifted else None
    B = text_emb.shape[0]

    def denoise(z, t):
        if guidance_scale == 1.0:
            return model.denoise(z, t, text_emb, c, context).float(), None
        # one batched forward: first half conditional, second half with the zeroed context
        drop = torch.arange(2 * B, device=z.device) >= B
        ctx = None if context is None else torch.cat([context, context])
        out = model.denoise(torch.cat([z, z]), torch.cat([t, t]), torch.cat([text_emb, text_emb]),
                            torch.cat([c, c]), ctx, drop).float()
        return out[:B], out[B:]

    z = diffusion.sample(denoise, mu_s, scale, steps, generator, guidance_scale, bounds)
    return torch.nn.functional.normalize(z, dim=-1)
