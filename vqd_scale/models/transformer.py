"""VQ-Diffusion AdaLN transformer over image tokens, with per-sample timesteps and a size registry.

Layout (chosen so the weights map 1:1 onto diffusers' `Transformer2DModel(..., activation_fn=
"geglu-approximate", attention_bias=True, norm_type="ada_norm")`, see `interop/diffusers.py`):
- AdaLN: `LayerNorm(eps=1e-5, no affine)(h)·(1+scale)+shift`, `[scale, shift] = Linear(SiLU(Emb(t)))`
  with Emb an `nn.Embedding(T, D)` and scale = the *first* half (diffusers' `temb.chunk(2)` and the
  official `torch.chunk(emb, 2, dim=2)` agree). Unlike diffusers, `t` is per sample (`Long[B]`).
- MLP: `Linear(D, r·D) → x·σ(1.702x) → Linear(r·D, D)` after an affine LayerNorm. diffusers'
  "geglu-approximate" is `ApproximateGELU` = exactly this (not a gated unit), and it is the
  original's GELU2, so the official, diffusers and our weights all agree.
- Self-attention q/k/v are one fused Linear (split on export); cross-attention k/v are one fused
  Linear over the context, cacheable per sampling run (`encode_context`).
- Head: affine LayerNorm(eps=1e-5) + Linear(D→K), log_softmax over K, output `[B, K, N]`.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from vqd_scale.config import TransformerConfig

ContextKV = tuple[tuple[torch.Tensor, torch.Tensor], ...]  # per layer (k, v), each [B, H, L, hd]


@dataclass(frozen=True)
class ModelSize:
    """Depth, width, heads and MLP ratio of one registry entry."""
    layers: int
    dim: int
    heads: int
    mlp_ratio: float = 4.0


# Paper table (Gu et al. 2022; Tang et al. 2022). S originally used a 3×3 conv MLP, which has no
# diffusers equivalent; we keep the linear MLP and widen it (ratio 16) so S still has ≈34M params.
MODEL_SIZES: dict[str, ModelSize] = {
    "debug": ModelSize(layers=2, dim=64, heads=2),
    "S": ModelSize(layers=18, dim=192, heads=16, mlp_ratio=16.0),
    "B": ModelSize(layers=19, dim=1024, heads=16),
    "L": ModelSize(layers=36, dim=1408, heads=16),  # head dim 88 (ITHQ, Improved VQ-Diffusion)
}


def resolve_size(cfg: TransformerConfig) -> ModelSize:
    """Registry entry for `cfg.size` with any explicit layers/dim/heads/mlp_ratio overriding it."""
    if cfg.size not in MODEL_SIZES:
        raise ValueError(f"model.size={cfg.size!r} unknown; use one of {sorted(MODEL_SIZES)}")
    base = MODEL_SIZES[cfg.size]
    over = {k: getattr(cfg, k) for k in ("layers", "dim", "heads", "mlp_ratio") if getattr(cfg, k) is not None}
    size = dataclasses.replace(base, **over)
    if size.dim % size.heads:
        raise ValueError(f"model.dim ({size.dim}) must be divisible by model.heads ({size.heads})")
    return size


GELU2 = 1.702  # the sigmoid-GELU slope of the official code and diffusers


class AdaLayerNorm(nn.Module):
    """LayerNorm without affine, modulated per sample by the timestep: LN(h)·(1+scale)+shift."""

    def __init__(self, dim: int, num_timesteps: int):
        super().__init__()
        self.emb = nn.Embedding(num_timesteps, dim)
        self.linear = nn.Linear(dim, 2 * dim)
        self.dim = dim

    def forward(self, h: torch.Tensor, t: torch.Tensor, emb_add: Optional[torch.Tensor] = None) -> torch.Tensor:
        emb = self.emb(t) if emb_add is None else self.emb(t) + emb_add  # + a global condition [B, D] (decoder)
        scale, shift = self.linear(F.silu(emb)).unsqueeze(1).chunk(2, dim=-1)  # [B,1,D] each
        # addcmul: one fused pass instead of separate multiply and add over the [B, N, D] activations
        return torch.addcmul(shift, F.layer_norm(h, (self.dim,), eps=1e-5), 1 + scale)


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, L, H·hd] → [B, H, L, hd]."""
    return x.unflatten(-1, (heads, -1)).transpose(1, 2)


class Block(nn.Module):
    """x += SelfAttn(AdaLN₁(x,t)); x += CrossAttn(AdaLN₂(x,t), ctx); x += MLP(LN(x))."""

    def __init__(self, dim: int, heads: int, context_dim: int, mlp_ratio: float, num_timesteps: int,
                 dropout: float):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.norm1 = AdaLayerNorm(dim, num_timesteps)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj1 = nn.Linear(dim, dim)
        self.norm2 = AdaLayerNorm(dim, num_timesteps)
        self.q2 = nn.Linear(dim, dim)
        self.kv2 = nn.Linear(context_dim, 2 * dim)
        self.proj2 = nn.Linear(dim, dim)
        self.norm3 = nn.LayerNorm(dim, eps=1e-5)
        hidden = int(dim * mlp_ratio)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def context_kv(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Cross-attention (k, v) of a context [B, L, Dc], each [B, H, L, hd]."""
        k, v = self.kv2(context).chunk(2, dim=-1)
        return _heads(k, self.heads), _heads(v, self.heads)

    def _drop(self, x: torch.Tensor) -> torch.Tensor:
        # Skip the call entirely at p = 0: no mask generation or extra pass in training mode.
        return F.dropout(x, self.dropout, True) if self.dropout > 0 and self.training else x

    def _attend(self, q, k, v) -> torch.Tensor:
        p = self.dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=p)  # [B, H, N, hd]
        return out.transpose(1, 2).flatten(2)  # [B, N, D]

    def forward(self, x: torch.Tensor, t: torch.Tensor, k2: torch.Tensor, v2: torch.Tensor,
                emb_add: Optional[torch.Tensor] = None) -> torch.Tensor:
        q, k, v = (_heads(z, self.heads) for z in self.qkv(self.norm1(x, t, emb_add)).chunk(3, dim=-1))
        x = x + self._drop(self.proj1(self._attend(q, k, v)))
        q = _heads(self.q2(self.norm2(x, t, emb_add)), self.heads)
        x = x + self._drop(self.proj2(self._attend(q, k2, v2)))
        # GELU2 (diffusers' ApproximateGELU) h·σ(1.702h) = silu(1.702h)/1.702: both constants are folded
        # into the small weights, so the [B, N, r·D] activations get one fused pass instead of three.
        h = F.linear(self.norm3(x), self.fc1.weight * GELU2, self.fc1.bias * GELU2)
        h = F.silu(h, inplace=not torch.is_grad_enabled())  # silu's backward needs its input
        return x + self._drop(F.linear(h, self.fc2.weight / GELU2, self.fc2.bias))


class VQDiffusionTransformer(nn.Module):
    """p̃_θ(x̃_0 | x_t, t, text) over K codes for image tokens x_t (mask id K)."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        if cfg.num_classes < 2:
            raise ValueError(f"model.num_classes must be set to K (non-mask codes, from the token manifest); "
                             f"got {cfg.num_classes}")
        self.cfg = cfg
        self.size = s = resolve_size(cfg)
        self.num_classes, self.num_tokens = cfg.num_classes, cfg.height * cfg.width
        self.token_emb = nn.Embedding(cfg.num_classes + 1, s.dim)  # row K = [MASK]
        self.row_emb = nn.Embedding(cfg.height, s.dim)
        self.col_emb = nn.Embedding(cfg.width, s.dim)
        self.blocks = nn.ModuleList(
            Block(s.dim, s.heads, cfg.context_dim, s.mlp_ratio, cfg.num_timesteps, cfg.dropout)
            for _ in range(s.layers))
        self.norm_out = nn.LayerNorm(s.dim, eps=1e-5)
        self.out = nn.Linear(s.dim, cfg.num_classes)
        # Learned null text for classifier-free guidance; randn like the official `empty_text_embed`.
        self.null_context = nn.Parameter(torch.randn(cfg.context_len, cfg.context_dim))
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, 0.0, 0.02)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm) and m.elementwise_affine:
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def encode_context(self, context: Optional[torch.Tensor] = None, batch_size: int = 1) -> ContextKV:
        """Per-layer cross-attention (k, v) of context [B, L, Dc]; None = the learned null context."""
        if context is None:
            context = self.null_context.unsqueeze(0).expand(batch_size, -1, -1)  # [B, L, Dc]
        if context.dim() != 3 or context.shape[-1] != self.cfg.context_dim:
            raise ValueError(f"context must be [B, L, {self.cfg.context_dim}] (model.context_dim), "
                             f"got {tuple(context.shape)}")
        return tuple(b.context_kv(context) for b in self.blocks)

    def embed(self, x_t: torch.Tensor) -> torch.Tensor:
        """Token + row + column embeddings, [B, N, D]."""
        h, w = self.cfg.height, self.cfg.width
        pos = self.row_emb.weight[:, None, :] + self.col_emb.weight[None, :, :]  # [h, w, D]
        return self.token_emb(x_t) + pos.reshape(h * w, -1)  # row-major, matches diffusers' flattening

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, context: Optional[torch.Tensor] = None,
                context_kv: Optional[ContextKV] = None, emb_add: Optional[torch.Tensor] = None) -> torch.Tensor:
        """log p̃(x̃_0) as F[B, K, N]; context None (and no context_kv) = null context; emb_add [B, D] is added
        to every AdaLN timestep embedding (a global condition, as unCLIP adds the image embedding)."""
        B = x_t.shape[0]
        self._check_inputs(x_t, t)
        if context_kv is None:
            context_kv = self.encode_context(context, batch_size=B)
        if context_kv[0][0].shape[0] != B:
            raise ValueError(f"context batch {context_kv[0][0].shape[0]} != x_t batch {B}")
        x = self.embed(x_t)
        for block, (k, v) in zip(self.blocks, context_kv):
            if self.cfg.activation_checkpointing and self.training:
                x = checkpoint(block, x, t, k, v, emb_add, use_reentrant=False)
            else:
                x = block(x, t, k, v, emb_add)
        # Logits written directly in the [B, K, N] layout the diffusion code reads (one GEMM, same cost):
        # a transposed [B, N, K] view would cost a full strided copy of the K×N output in the backward.
        h = self.norm_out(x).transpose(1, 2)  # [B, D, N]
        logits = torch.baddbmm(self.out.bias[:, None], self.out.weight.expand(B, -1, -1), h)  # [B, K, N]
        return F.log_softmax(logits.float(), dim=1)

    def _check_inputs(self, x_t: torch.Tensor, t: torch.Tensor) -> None:
        if x_t.dim() != 2 or x_t.shape[1] != self.num_tokens:
            raise ValueError(f"x_t must be Long[B, {self.num_tokens}] (model.height·model.width), "
                             f"got {tuple(x_t.shape)}")
        if t.dim() != 1 or t.shape[0] != x_t.shape[0]:
            raise ValueError(f"t must be Long[B] with one timestep per sample, got shape {tuple(t.shape)}")
        if not torch.compiler.is_compiling() and x_t.device.type == "cpu":
            # Cheap on CPU; on GPU this would force a sync every step, and embedding lookups assert anyway.
            if int(x_t.min()) < 0 or int(x_t.max()) > self.num_classes:
                raise ValueError(f"x_t ids must be in [0, {self.num_classes}] (mask = {self.num_classes}); "
                                 f"got range [{int(x_t.min())}, {int(x_t.max())}]")
            if int(t.min()) < 0 or int(t.max()) >= self.cfg.num_timesteps:
                raise ValueError(f"t must be in [0, {self.cfg.num_timesteps - 1}], got range "
                                 f"[{int(t.min())}, {int(t.max())}]")


def count_params(cfg: TransformerConfig) -> int:
    """Parameter count of a config, built on the meta device (instant, no memory)."""
    with torch.device("meta"):
        model = VQDiffusionTransformer(cfg)
    return sum(p.numel() for p in model.parameters())
