"""State-dict and config mapping between our transformer and diffusers' `Transformer2DModel`.

Our self-attention q/k/v and cross-attention k/v are fused Linears; diffusers keeps them separate,
so export splits them (rows q|k|v, in that order) and import concatenates them. The learned null
text embedding travels in the diffusers state dict under `NULL_KEY` (the pipeline stores it in
`LearnedClassifierFreeSamplingEmbeddings.embeddings`); `split_null` takes it out again.
"""
from __future__ import annotations

from typing import Any, Optional

import torch

from vqd_scale.config import TransformerConfig
from vqd_scale.errors import UserError
from vqd_scale.models.transformer import resolve_size

NULL_KEY = "learned_classifier_free_sampling_embeddings.embeddings"

# 1:1 renames (ours → diffusers); per-block entries use the block prefix.
_TOP = {
    "token_emb.weight": "latent_image_embedding.emb.weight",
    "row_emb.weight": "latent_image_embedding.height_emb.weight",
    "col_emb.weight": "latent_image_embedding.width_emb.weight",
    "norm_out.weight": "norm_out.weight", "norm_out.bias": "norm_out.bias",
    "out.weight": "out.weight", "out.bias": "out.bias",
    "null_context": NULL_KEY,
}
_BLOCK = {
    "norm1.emb.weight": "norm1.emb.weight", "norm1.linear.weight": "norm1.linear.weight",
    "norm1.linear.bias": "norm1.linear.bias",
    "proj1.weight": "attn1.to_out.0.weight", "proj1.bias": "attn1.to_out.0.bias",
    "norm2.emb.weight": "norm2.emb.weight", "norm2.linear.weight": "norm2.linear.weight",
    "norm2.linear.bias": "norm2.linear.bias",
    "q2.weight": "attn2.to_q.weight", "q2.bias": "attn2.to_q.bias",
    "proj2.weight": "attn2.to_out.0.weight", "proj2.bias": "attn2.to_out.0.bias",
    "norm3.weight": "norm3.weight", "norm3.bias": "norm3.bias",
    "fc1.weight": "ff.net.0.proj.weight", "fc1.bias": "ff.net.0.proj.bias",
    "fc2.weight": "ff.net.2.weight", "fc2.bias": "ff.net.2.bias",
}
# Fused (ours) → split (diffusers), in row order.
_FUSED = {"qkv": ("attn1.to_q", "attn1.to_k", "attn1.to_v"), "kv2": ("attn2.to_k", "attn2.to_v")}


def diffusers_config(cfg: TransformerConfig) -> dict[str, Any]:
    """`Transformer2DModel` kwargs for our config; refuses layouts diffusers cannot express."""
    s = resolve_size(cfg)
    if cfg.height != cfg.width:
        raise UserError(f"diffusers' Transformer2DModel needs a square token grid; got model.height="
                         f"{cfg.height}, model.width={cfg.width}")
    if s.mlp_ratio != 4.0:
        raise UserError(f"diffusers' FeedForward is fixed at 4×; this model has mlp_ratio={s.mlp_ratio} "
                         "(size S widens it to match the paper's 34M) — export needs model.mlp_ratio=4")
    return dict(num_attention_heads=s.heads, attention_head_dim=s.dim // s.heads, num_layers=s.layers,
                dropout=cfg.dropout, cross_attention_dim=cfg.context_dim, attention_bias=True,
                sample_size=cfg.height, num_vector_embeds=cfg.num_classes + 1,
                activation_fn="geglu-approximate", num_embeds_ada_norm=cfg.num_timesteps,
                norm_type="ada_norm", norm_elementwise_affine=True, norm_eps=1e-5)


def to_diffusers(sd: dict[str, torch.Tensor], cfg: TransformerConfig) -> tuple[dict, dict[str, torch.Tensor]]:
    """Our state dict → (diffusers config, diffusers state dict incl. NULL_KEY)."""
    config = diffusers_config(cfg)
    out: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        if k in _TOP:
            out[_TOP[k]] = v
            continue
        parts = k.split(".")
        if parts[0] != "blocks" or len(parts) < 4:
            raise UserError(f"unexpected key {k!r} in transformer state dict (is it a VQDiffusionTransformer?)")
        i, name, param = parts[1], ".".join(parts[2:]), parts[-1]
        mod = parts[2]
        if mod in _FUSED:
            for dst, chunk in zip(_FUSED[mod], v.chunk(len(_FUSED[mod]), dim=0)):
                out[f"transformer_blocks.{i}.{dst}.{param}"] = chunk.clone()
        elif name in _BLOCK:
            out[f"transformer_blocks.{i}.{_BLOCK[name]}"] = v
        else:
            raise UserError(f"unexpected key {k!r} in transformer state dict")
    return config, out


def config_from_diffusers(config: dict[str, Any], context_len: int = 77) -> TransformerConfig:
    """Our TransformerConfig for a diffusers `Transformer2DModel` config (explicit sizes)."""
    # diffusers' defaults for keys an older config may lack (these change the math, not the key names);
    # ours are exactly these values
    defaults = {"only_cross_attention": False, "double_self_attention": False, "norm_eps": 1e-5,
                "norm_elementwise_affine": True}
    expect = {"activation_fn": "geglu-approximate", "norm_type": "ada_norm", "attention_bias": True, **defaults}
    config = {**defaults, **config}
    if config.get("norm_type", "layer_norm") == "layer_norm" and config.get("num_embeds_ada_norm") is not None:
        # configs older than `norm_type` (the ITHQ hub model's): diffusers itself builds these as ada_norm
        config["norm_type"] = "ada_norm"
    for k, v in expect.items():
        if config.get(k) != v:
            raise UserError(f"diffusers transformer config {k}={config.get(k)!r}; only {v!r} maps onto "
                             "VQDiffusionTransformer")
    if config.get("num_vector_embeds") is None:
        raise UserError("diffusers transformer config has no num_vector_embeds: not a discrete (VQ) model")
    return TransformerConfig(
        size="debug", num_classes=int(config["num_vector_embeds"]) - 1, height=int(config["sample_size"]),
        width=int(config["sample_size"]), context_dim=int(config["cross_attention_dim"]),
        context_len=context_len, num_timesteps=int(config["num_embeds_ada_norm"]),
        layers=int(config["num_layers"]), heads=int(config["num_attention_heads"]),
        dim=int(config["num_attention_heads"]) * int(config["attention_head_dim"]), mlp_ratio=4.0,
        dropout=float(config.get("dropout", 0.0)))


def from_diffusers(config: dict[str, Any], dsd: dict[str, torch.Tensor],
                   null_embedding: Optional[torch.Tensor] = None) -> tuple[TransformerConfig, dict[str, torch.Tensor]]:
    """(diffusers config, diffusers state dict [+ NULL_KEY]) → (our config, our state dict)."""
    null = dsd.get(NULL_KEY, null_embedding)
    if null is None:
        raise UserError(f"no learned null embedding: pass null_embedding= (the pipeline's "
                         f"learned_classifier_free_sampling_embeddings) or include {NULL_KEY!r}")
    cfg = config_from_diffusers(config, context_len=null.shape[0])
    if null.dim() != 2 or null.shape[1] != cfg.context_dim:
        raise UserError(f"learned null embedding has shape {tuple(null.shape)}; the transformer's "
                         f"cross_attention_dim={cfg.context_dim} needs [L, {cfg.context_dim}]: pass the null "
                         "embedding of this same checkpoint")
    inv_top = {v: k for k, v in _TOP.items()}
    inv_block = {v: k for k, v in _BLOCK.items()}
    out: dict[str, torch.Tensor] = {"null_context": null}
    pending: dict[str, dict[str, torch.Tensor]] = {}
    for k, v in dsd.items():
        if k == NULL_KEY:
            continue
        if k in inv_top:
            out[inv_top[k]] = v
            continue
        parts = k.split(".")
        if parts[0] != "transformer_blocks":
            raise UserError(f"unexpected diffusers key {k!r}")
        i, name = parts[1], ".".join(parts[2:])
        if name in inv_block:
            out[f"blocks.{i}.{inv_block[name]}"] = v
            continue
        for ours, srcs in _FUSED.items():
            for src in srcs:
                if name.startswith(src + "."):
                    pending.setdefault(f"blocks.{i}.{ours}.{parts[-1]}", {})[src] = v
                    break
            else:
                continue
            break
        else:
            raise UserError(f"unexpected diffusers key {k!r}")
    for key, pieces in pending.items():
        srcs = _FUSED[key.split(".")[2]]
        missing = [s for s in srcs if s not in pieces]
        if missing:
            raise UserError(f"diffusers state dict lacks {missing} for {key}")
        out[key] = torch.cat([pieces[s] for s in srcs], dim=0)
    return cfg, out


def split_null(dsd: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], Optional[torch.Tensor]]:
    """(transformer-only state dict, null embedding or None) for loading into `Transformer2DModel`."""
    rest = {k: v for k, v in dsd.items() if k != NULL_KEY}
    return rest, dsd.get(NULL_KEY)
