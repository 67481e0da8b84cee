"""Corgi decoder: the VQ-Diffusion transformer conditioned on a CLIP image embedding (+ optional text).

The embedding e [B,E] enters twice, as unCLIP / DALLE2-pytorch / Karlo do (spec: corgi_decoder.md §2, B+C):
- projected to `image_tokens` context rows [B,n,Dc], appended after the text features in cross-attention;
- projected to the model width [B,D] and added to every AdaLN timestep embedding.
A learned null embedding replaces e per sample (dropout, CFG); the text has the transformer's learned
null context. Without text (`with_text=false`) the cross-attention sees only the image rows.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from vqd_scale.config import DecoderConfig, TransformerConfig
from vqd_scale.models.transformer import ContextKV, VQDiffusionTransformer


@dataclass
class Condition:
    """A batch's encoded condition, computed once per sampling run: cross-attention K/V and the AdaLN addend."""
    kv: ContextKV
    emb_add: torch.Tensor  # [B, D]

    def cat(self, other: "Condition") -> "Condition":
        """[self; other] along the batch (CFG's conditional and unconditional halves in one forward)."""
        kv = tuple((torch.cat([k1, k2]), torch.cat([v1, v2])) for (k1, v1), (k2, v2) in zip(self.kv, other.kv))
        return Condition(kv, torch.cat([self.emb_add, other.emb_add]))


def perturb(emb: torch.Tensor, alpha: float, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """normalize(e + α·ε/‖ε‖), ε ~ N(0, I): the language-free bridge of CLIP-VQDiffusion (α = 0 returns e)."""
    if alpha == 0:
        return emb
    eps = torch.randn(emb.shape, generator=generator, device=emb.device, dtype=torch.float32)
    e = F.normalize(emb.float(), dim=-1) + alpha * F.normalize(eps, dim=-1)
    return F.normalize(e, dim=-1).to(emb.dtype)


class ImageConditionedTransformer(VQDiffusionTransformer):
    """p̃_θ(x̃_0 | x_t, t, CLIP image embedding[, text]) over K codes (mask id K)."""

    def __init__(self, cfg: TransformerConfig, dcfg: DecoderConfig):
        super().__init__(cfg)
        self.dcfg = dcfg
        E, n, Dc = dcfg.embed_dim, dcfg.image_tokens, cfg.context_dim
        self.image_to_tokens = nn.Linear(E, n * Dc)
        self.image_to_time = nn.Linear(E, self.size.dim)
        # learned null embedding for CFG, on the unit sphere like the (standardised) embeddings it replaces
        self.null_image = nn.Parameter(F.normalize(torch.randn(E), dim=0))
        # the data's embedding mean and per-dim std (identity until `load_embed_stats`): frozen Parameters, not
        # buffers, so the EMA weights and every checkpoint carry them (as the prior's mixture)
        self.embed_mean = nn.Parameter(torch.zeros(E), requires_grad=False)
        self.embed_std = nn.Parameter(torch.ones(E), requires_grad=False)
        for m in (self.image_to_tokens, self.image_to_time):
            self._init_weights(m)
        if not dcfg.with_text:
            self.null_context = None  # no text path: an unused parameter would only confuse ZeRO and the EMA

    @torch.no_grad()
    def load_embed_stats(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Standardise embeddings by the data's mean and per-dim std [E] (decoder.embed_stats)."""
        E = self.dcfg.embed_dim
        if mean.shape != (E,) or std.shape != (E,) or not (std > 0).all():
            raise ValueError(f"embedding stats must be mean/std [{E}] with std > 0, got "
                             f"{tuple(mean.shape)}/{tuple(std.shape)}")
        self.embed_mean.copy_(mean)
        self.embed_std.copy_(std * E ** 0.5)  # rows of norm ≈ 1, the scale of the unit embeddings and the null

    def standardise(self, e: torch.Tensor) -> torch.Tensor:
        """(e − mean)/(std·√E): unit-scale rows whatever the data's common direction (a random tiny CLIP's
        embeddings share one to cos ≈ 0.998, so raw they differ by a few % of their norm); identity by default."""
        return (e - self.embed_mean.to(e.dtype)) / self.embed_std.to(e.dtype)

    def condition(self, image_emb: torch.Tensor, context: Optional[torch.Tensor] = None,
                  drop_image: Optional[torch.Tensor] = None, drop_text: Optional[torch.Tensor] = None) -> Condition:
        """Encode e [B,E] (+ text features [B,L,Dc]); rows with drop_* Bool[B] get the learned nulls."""
        B, E = image_emb.shape
        if E != self.dcfg.embed_dim:
            raise ValueError(f"image_emb must be [B, {self.dcfg.embed_dim}] (decoder.embed_dim), "
                             f"got {tuple(image_emb.shape)}")
        dtype = self.image_to_tokens.weight.dtype
        e = self.standardise(image_emb.to(dtype))
        if drop_image is not None:
            e = torch.where(drop_image.view(-1, 1), self.null_image.to(dtype).expand_as(e), e)
        rows = self.image_to_tokens(e).view(B, self.dcfg.image_tokens, -1)  # [B, n, Dc]
        if self.dcfg.with_text:
            if context is None:  # no caption at all: the learned null text
                context = self.null_context.unsqueeze(0).expand(B, -1, -1)
            context = context.to(dtype)
            if drop_text is not None:
                null = self.null_context.to(dtype).unsqueeze(0).expand_as(context)
                context = torch.where(drop_text.view(-1, 1, 1), null, context)
            rows = torch.cat([context, rows], dim=1)  # [B, L + n, Dc]
        kv = tuple(b.context_kv(rows) for b in self.blocks)
        return Condition(kv, self.image_to_time(e))

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, image_emb: Optional[torch.Tensor] = None,
                context: Optional[torch.Tensor] = None, drop_image: Optional[torch.Tensor] = None,
                drop_text: Optional[torch.Tensor] = None, cond: Optional[Condition] = None) -> torch.Tensor:
        """log p̃(x̃_0) F[B,K,N] from e (+ text) or a precomputed `cond`; nulls are used inside this forward
        (where ZeRO-3 has gathered them), which is why this is a subclass and not a wrapper."""
        if cond is None:
            if image_emb is None:
                raise ValueError("the decoder needs image_emb [B, E] (or a precomputed cond)")
            cond = self.condition(image_emb, context, drop_image, drop_text)
        return super().forward(x_t, t, context_kv=cond.kv, emb_add=cond.emb_add)
