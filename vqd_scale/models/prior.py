"""Shifted-diffusion prior (Corgi): a decoder-only transformer text → CLIP image embedding, plus its mixture.

Sequence (as released): [text-token context (L), text embedding, timestep, component index, z_t,
learned query]; causal self-attention; an MLP on the last (query) token predicts ẑ_0.
The mixture holds the k Gaussian components N(μ_c, σ_c²) the diffusion starts from and picks one
per pair by cosine(text embedding, μ_c). No distributed code.

Embedding space: the model and its mixture live in z = s·e/‖e‖ with e the stored CLIP embedding and
s = `prior_scale(cfg)` (√E by default: per-dim RMS 1, the scale of the unit DDPM noise). Clusters are
fitted on the unit sphere and scaled by s when loaded (`PriorModel.load_clusters`).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from torch import nn
from torch.utils.checkpoint import checkpoint

from vqd_scale.config import PriorConfig
from vqd_scale.errors import UserError


@dataclass(frozen=True)
class PriorSize:
    dim: int
    heads: int
    layers: int


# The release trains 2048 wide, 32 heads, 8 layers by default, 16–20 for the larger priors.
PRIOR_SIZES: dict[str, PriorSize] = {
    "debug": PriorSize(dim=64, heads=4, layers=2),
    "corgi-8": PriorSize(dim=2048, heads=32, layers=8),
    "corgi-16": PriorSize(dim=2048, heads=32, layers=16),
    "corgi-20": PriorSize(dim=2048, heads=32, layers=20),
}


def prior_scale(cfg: PriorConfig) -> float:
    """s of the prior's space z = s·e (e unit-norm): `prior.embed_scale`, or √embed_dim when unset."""
    s = math.sqrt(cfg.embed_dim) if cfg.embed_scale is None else float(cfg.embed_scale)
    if not s > 0:
        raise UserError(f"prior.embed_scale={cfg.embed_scale} must be > 0 (or null for √embed_dim)")
    return s


def resolve_prior_size(cfg: PriorConfig) -> PriorSize:
    """The registry entry named by `cfg.size`, with explicit dim/heads/layers overriding it."""
    if cfg.size not in PRIOR_SIZES:
        raise UserError(f"prior.size={cfg.size!r} unknown; use one of {sorted(PRIOR_SIZES)}")
    over = {k: getattr(cfg, k) for k in ("dim", "heads", "layers") if getattr(cfg, k) is not None}
    size = dataclasses.replace(PRIOR_SIZES[cfg.size], **over)
    if size.dim % size.heads:
        raise UserError(f"prior dim={size.dim} is not divisible by heads={size.heads}; fix prior.dim/heads")
    return size


class Mixture(nn.Module):
    """k diagonal Gaussians over the embedding; optionally learnable at a reduced learning rate.

    Learnable means/log-stds are stored as `base + lr_scale · offset` with `offset` the parameter:
    Adam's update size does not depend on the gradient's scale, so scaling the *parameterisation*
    is what gives the 0.01 learning-rate scale without touching the engine's optimizer groups.
    """

    def __init__(self, num_components: int, embed_dim: int, learnable: bool = False, lr_scale: float = 0.01):
        super().__init__()
        self.lr_scale = lr_scale
        # frozen Parameters, not buffers: the engine's EMA and ema.safetensors hold parameters only, and
        # a checkpoint must carry its mixture (the optimizer skips them: requires_grad=False)
        self.base_means = nn.Parameter(torch.zeros(num_components, embed_dim), requires_grad=False)
        self.base_log_stds = nn.Parameter(torch.zeros(num_components, embed_dim), requires_grad=False)
        self.learnable = learnable
        if learnable:
            self.mean_offset = nn.Parameter(torch.zeros(num_components, embed_dim))
            self.log_std_offset = nn.Parameter(torch.zeros(num_components, embed_dim))

    @torch.no_grad()
    def load_clusters(self, means: torch.Tensor, stds: torch.Tensor) -> None:
        """Set the components from fitted clusters (means, per-dim stds [k, E])."""
        if means.shape != self.base_means.shape or stds.shape != self.base_means.shape:
            raise UserError(f"clusters are {tuple(means.shape)}/{tuple(stds.shape)} but the prior expects "
                             f"{tuple(self.base_means.shape)}; set prior.num_components/embed_dim to match the file")
        if not (stds > 0).all():
            raise UserError("cluster stds must be > 0 (a zero std makes sampling deterministic); refit the clusters")
        self.base_means.copy_(means)
        self.base_log_stds.copy_(stds.log())

    def means(self) -> torch.Tensor:
        return self.base_means + self.lr_scale * self.mean_offset if self.learnable else self.base_means

    def stds(self) -> torch.Tensor:
        log_s = self.base_log_stds + self.lr_scale * self.log_std_offset if self.learnable else self.base_log_stds
        return log_s.exp()

    def choose(self, text_emb: torch.Tensor) -> torch.Tensor:
        """Component per pair: argmax_c cos(text embedding, μ_c); LongTensor[B]."""
        with torch.no_grad():
            sim = F.normalize(text_emb.float(), dim=-1) @ F.normalize(self.means().float(), dim=-1).T  # [B, k]
        return sim.argmax(1)

    def forward(self, text_emb: torch.Tensor, z0: Optional[torch.Tensor] = None, kappa: float = 1.0,
                aux_noise: Optional[torch.Tensor] = None, weight: Optional[torch.Tensor] = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict]:
        """(component [B], μ [B,E], σ [B,E], aux losses) per pair; the aux losses need z0 and aux_noise.

        weight [B]: the per-sample loss weight (P2) the aux losses are scaled by, as released; None = 1.
        One forward computes everything that reads the parameters, so ZeRO-3 (which gathers a
        module's parameters around its forward) sees them whole.
        """
        c = self.choose(text_emb)
        means, stds = self.means(), self.stds()
        aux = {}
        if self.learnable and z0 is not None and aux_noise is not None:
            w = z0.new_ones(z0.shape[0]) if weight is None else weight.to(z0.dtype)
            aux = self._aux_losses(means[c], stds[c], z0, kappa, aux_noise, w)
        return c, means[c], stds[c], aux

    @staticmethod
    def _aux_losses(mu: torch.Tensor, sd: torch.Tensor, z0: torch.Tensor, kappa: float, noise: torch.Tensor,
                    weight: torch.Tensor) -> dict:
        """Learnable-mixture losses as released (`training_losses`), each P2-weighted per sample.

        pull: −w_i · mean_d cos(z0_i, μ_{c_i} + κσ_{c_i} ε_d) over D draws (noise [D, B, E]; D = 16 released);
        push: w_i · (1/B) Σ_{j≠i} cos(μ_{c_i}, μ_{c_j}) over the batch's chosen means (pairs that share a
        component add a constant 1, no gradient), pushing components apart.
        """
        draws = mu + kappa * sd * noise  # [D, B, E]
        pull = -(weight * F.cosine_similarity(draws, z0.float().unsqueeze(0), dim=-1).mean(0)).mean()
        m = F.normalize(mu, dim=-1)
        sim = m @ m.T  # [B, B]
        off = sim - torch.diag_embed(sim.diagonal())
        push = (weight * off.mean(1)).mean()
        return {"mixture_pull": pull, "mixture_push": push}


class Block(nn.Module):
    """Pre-LN causal self-attention + MLP."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, S, D = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(B, S, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)  # 3×[B,H,S,d]
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(B, S, D))  # [B,H,S,d] → [B,S,D]
        return x + self.mlp(self.ln2(x))


class PriorModel(nn.Module):
    """Decoder-only prior transformer + mixture. `forward` predicts ẑ_0 [B, E]."""

    def __init__(self, cfg: PriorConfig, learnable_mixture: bool = False, mixture_lr_scale: float = 0.01):
        super().__init__()
        self.cfg = cfg
        size = resolve_prior_size(cfg)
        self.size, D = size, size.dim
        self.activation_checkpointing = cfg.activation_checkpointing
        self.embed_scale = prior_scale(cfg)
        self.mixture = Mixture(cfg.num_components, cfg.embed_dim, learnable_mixture, mixture_lr_scale)
        self.context_proj = nn.Linear(cfg.context_dim, D)
        self.text_proj = nn.Linear(cfg.embed_dim, D)
        self.time_proj = Timesteps(D, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_mlp = TimestepEmbedding(D, D)
        self.component_emb = nn.Embedding(cfg.num_components, D)
        self.z_proj = nn.Linear(cfg.embed_dim, D)
        self.query = nn.Parameter(torch.randn(D) / math.sqrt(D))
        self.pos_emb = nn.Parameter(torch.randn(cfg.context_len + 5, D) * 0.02)  # L context + 5 special tokens
        self.blocks = nn.ModuleList(Block(D, size.heads) for _ in range(size.layers))
        self.head = nn.Sequential(nn.LayerNorm(D), nn.Linear(D, D), nn.GELU(), nn.Linear(D, cfg.embed_dim))

    def load_clusters(self, means: torch.Tensor, stds: torch.Tensor) -> None:
        """Set the mixture from clusters fitted on the unit sphere (tools/fit_prior_clusters.py), scaled by s."""
        self.mixture.load_clusters(means.float() * self.embed_scale, stds.float() * self.embed_scale)

    def to_prior_space(self, emb: torch.Tensor) -> torch.Tensor:
        """z = s·e/‖e‖ for stored CLIP embeddings e [B, E] (float32)."""
        return F.normalize(emb.float(), dim=-1) * self.embed_scale

    def forward(self, z_t: torch.Tensor, t: torch.Tensor, text_emb: torch.Tensor, component: torch.Tensor,
                context: Optional[torch.Tensor] = None, drop_text: Optional[torch.Tensor] = None) -> torch.Tensor:
        """ẑ_0 (see `denoise`)."""
        return self.denoise(z_t, t, text_emb, component, context, drop_text)

    def denoise(self, z_t: torch.Tensor, t: torch.Tensor, text_emb: torch.Tensor, component: torch.Tensor,
                context: Optional[torch.Tensor] = None, drop_text: Optional[torch.Tensor] = None) -> torch.Tensor:
        """ẑ_0 from z_t [B,E], t [B], text embedding [B,E], component [B] and context [B,L,Dc]; z_t, ẑ_0 and
        the text embedding in the prior's space (`to_prior_space`).

        Context None (or rows with drop_text) = the zeroed text-token context used for CFG.
        """
        B, L = z_t.shape[0], self.cfg.context_len
        dtype = self.z_proj.weight.dtype
        if context is None:
            context = z_t.new_zeros(B, L, self.cfg.context_dim)
        if context.shape[1:] != (L, self.cfg.context_dim):
            raise UserError(f"prior context is {tuple(context.shape)}; expected [B, {L}, {self.cfg.context_dim}] "
                             "(prior.context_len / context_dim must match the text features)")
        context = context.to(dtype)
        if drop_text is not None:
            context = context * (~drop_text.bool()).view(-1, 1, 1).to(dtype)  # zeroed context: CFG null
        temb = self.time_mlp(self.time_proj(t).to(dtype))
        special = torch.stack([self.text_proj(text_emb.to(dtype)), temb, self.component_emb(component),
                               self.z_proj(z_t.to(dtype)), self.query.expand(B, -1)], dim=1)  # [B, 5, D]
        x = torch.cat([self.context_proj(context), special], dim=1) + self.pos_emb  # [B, L+5, D]
        for blk in self.blocks:
            x = checkpoint(blk, x, use_reentrant=False) if self.activation_checkpointing and self.training else blk(x)
        return self.head(x[:, -1])
