"""Text (or a CLIP image embedding) → image tokens: binds the transformer and text encoder to the sampler in
`diffusion/sampling.py`.

Text features and the cross-attention K/V of the text and of the learned null text are computed
once per run; with guidance each step is one batched forward over [cond; uncond].
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch

from vqd_scale.config import SamplerConfig
from vqd_scale.diffusion.discrete import MaskAndReplace
from vqd_scale.diffusion.sampling import Denoise, sample
from vqd_scale.errors import UserError
from vqd_scale.models.decoder import ImageConditionedTransformer
from vqd_scale.models.text import FrozenCLIPTextEncoder
from vqd_scale.models.transformer import ContextKV, VQDiffusionTransformer


def stack_context_kv(cond: ContextKV, uncond: ContextKV) -> ContextKV:
    """Per-layer [cond; uncond] K/V along the batch (uncond of batch 1 is broadcast to cond's)."""
    B = cond[0][0].shape[0]
    return tuple((torch.cat([kc, ku.expand(B, -1, -1, -1)]), torch.cat([vc, vu.expand(B, -1, -1, -1)]))
                 for (kc, vc), (ku, vu) in zip(cond, uncond))


def make_denoise(model: VQDiffusionTransformer, context: torch.Tensor, guided: bool,
                 autocast_dtype: Optional[torch.dtype] = None) -> Denoise:
    """`denoise(x_t, t) -> (log_p_cond, log_p_uncond | None)` over a fixed text context [B, L, Dc]."""
    kv_cond = model.encode_context(context)
    kv = stack_context_kv(kv_cond, model.encode_context(None, batch_size=1)) if guided else kv_cond
    device_type = context.device.type
    amp = (torch.autocast(device_type, dtype=autocast_dtype) if autocast_dtype is not None
           else contextlib.nullcontext())

    def denoise(x_t: torch.Tensor, t: torch.Tensor):
        with amp:
            if not guided:
                return model(x_t, t, context_kv=kv).float(), None
            out = model(torch.cat([x_t, x_t]), torch.cat([t, t]), context_kv=kv).float()  # [2B, K, N]
            return out.chunk(2)

    return denoise


@torch.inference_mode()
def generate(model: VQDiffusionTransformer, text_encoder: FrozenCLIPTextEncoder, diffusion: MaskAndReplace,
             text_tokens: torch.Tensor, cfg: SamplerConfig, generator: Optional[torch.Generator] = None,
             autocast_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Long[B, N] image tokens for text tokens Long[B, 77], in chunks of `cfg.batch_size`."""
    if diffusion.num_classes != model.num_classes:
        raise ValueError(f"diffusion has K={diffusion.num_classes} codes but the model predicts "
                         f"{model.num_classes}; build MaskAndReplace with model.cfg.num_classes")
    if text_encoder.width != model.cfg.context_dim:
        raise UserError(f"text encoder width {text_encoder.width} != model.context_dim "
                         f"{model.cfg.context_dim}; the model was trained with another text tower")
    if cfg.batch_size < 1:
        raise UserError(f"sampler.batch_size must be >= 1, got {cfg.batch_size}")
    model.eval()
    device = next(model.parameters()).device
    diffusion.to(device)
    guided = cfg.guidance_scale != 1.0
    out = []
    for chunk in text_tokens.split(cfg.batch_size):
        context = text_encoder(chunk.to(device)).to(next(model.parameters()).dtype)  # [b, 77, width]
        denoise = make_denoise(model, context, guided, autocast_dtype)
        out.append(sample(diffusion, denoise, chunk.shape[0], model.num_tokens, cfg, generator, device=device))
    return torch.cat(out)


@torch.inference_mode()
def generate_from_embeddings(model: ImageConditionedTransformer, diffusion: MaskAndReplace, image_emb: torch.Tensor,
                             cfg: SamplerConfig, generator: Optional[torch.Generator] = None,
                             text_encoder: Optional[FrozenCLIPTextEncoder] = None,
                             text_tokens: Optional[torch.Tensor] = None, guidance_drops: str = "both",
                             autocast_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Long[B, N] image tokens for CLIP image embeddings F[B, E] (+ captions when the decoder reads text).

    With guidance the unconditional half nulls `guidance_drops` ("image", "text" or "both"), as trained by the
    independent dropouts; the condition of both halves is encoded once per chunk.
    """
    if diffusion.num_classes != model.num_classes:
        raise ValueError(f"diffusion has K={diffusion.num_classes} codes but the model predicts {model.num_classes}")
    if cfg.batch_size < 1:
        raise UserError(f"sampler.batch_size must be >= 1, got {cfg.batch_size}")
    with_text = model.dcfg.with_text and text_tokens is not None
    if with_text and (text_encoder is None or text_encoder.width != model.cfg.context_dim):
        raise UserError("the decoder reads text: give the run's text tower (width = model.context_dim)")
    model.eval()
    device = next(model.parameters()).device
    diffusion.to(device)
    guided = cfg.guidance_scale != 1.0
    amp = (torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None
           else contextlib.nullcontext())
    out = []
    for i in range(0, image_emb.shape[0], cfg.batch_size):
        e = image_emb[i:i + cfg.batch_size].to(device)
        b = e.shape[0]
        context = text_encoder(text_tokens[i:i + b].to(device)) if with_text else None
        cond = model.condition(e, context)
        if guided:
            null = torch.ones(b, dtype=torch.bool, device=device)
            keep = torch.zeros_like(null)
            drop_image = null if guidance_drops in ("image", "both") else keep
            drop_text = null if guidance_drops in ("text", "both") else keep
            cond = cond.cat(model.condition(e, context, drop_image=drop_image, drop_text=drop_text))

        def denoise(x_t: torch.Tensor, t: torch.Tensor, cond=cond):
            with amp:
                if not guided:
                    return model(x_t, t, cond=cond).float(), None
                return model(torch.cat([x_t, x_t]), torch.cat([t, t]), cond=cond).float().chunk(2)

        out.append(sample(diffusion, denoise, b, model.num_tokens, cfg, generator, device=device))
    return torch.cat(out)
