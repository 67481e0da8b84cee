"""Official microsoft/VQ-Diffusion `.pth` → our transformer state dict (key names from its transformer_utils.py).

The official checkpoint is `{"model": {...}, "ema": {...}}`; the model keys sit under
`transformer.transformer.` (`Text2ImageTransformer`), the null text under `transformer.empty_text_embed`;
EMA keys lack the leading `transformer.` (the official inference always loads EMA weights).
"""
from __future__ import annotations

import re
from pathlib import Path

import torch

from vqd_scale.config import TransformerConfig
from vqd_scale.errors import UserError

PREFIX = "transformer.transformer."
NULL = "transformer.empty_text_embed"
_TOP = {"content_emb.emb.weight": "token_emb.weight", "content_emb.height_emb.weight": "row_emb.weight",
        "content_emb.width_emb.weight": "col_emb.weight", "to_logits.0.weight": "norm_out.weight",
        "to_logits.0.bias": "norm_out.bias", "to_logits.1.weight": "out.weight", "to_logits.1.bias": "out.bias"}
_BLOCK = {"ln1": "norm1", "ln1_1": "norm2", "ln2": "norm3", "attn1.proj": "proj1", "attn2.query": "q2",
          "attn2.proj": "proj2", "mlp.0": "fc1", "mlp.2": "fc2"}
_FUSED = {"attn1": ("qkv", ("query", "key", "value")), "attn2": ("kv2", ("key", "value"))}


def merge_ema(ckpt: dict, use_ema: bool = True) -> dict[str, torch.Tensor]:
    """Flat official state dict, EMA weights overriding the raw ones (as the official inference does)."""
    if "model" not in ckpt:
        raise UserError("not an official VQ-Diffusion checkpoint: no 'model' key")
    sd = dict(ckpt["model"])
    if use_ema and "ema" in ckpt:
        sd.update({f"transformer.{k}": v for k, v in ckpt["ema"].items()})
    return sd


def from_official(sd: dict[str, torch.Tensor], heads: int = 16) -> tuple[TransformerConfig, dict[str, torch.Tensor]]:
    """Flat official state dict → (our config, our state dict); heads are not in the weights (released: 16)."""
    out: dict[str, torch.Tensor] = {}
    fused: dict[str, dict[str, torch.Tensor]] = {}
    for k, v in sd.items():
        if not k.startswith(PREFIX):
            continue
        name = k[len(PREFIX):]
        if name in _TOP:
            out[_TOP[name]] = v
            continue
        m = re.fullmatch(r"blocks\.(\d+)\.(.+)\.(weight|bias)", name)
        if not m:
            raise UserError(f"unexpected official key {k!r}")
        i, mod, param = m.groups()
        if mod.startswith("mlp.conv"):
            raise UserError("this checkpoint uses the conv MLP (mlp_type=conv_mlp); only the linear MLP maps")
        if mod.endswith(".emb") or mod.endswith(".linear"):  # AdaLN: ln1 / ln1_1 .emb / .linear
            ln, sub = mod.rsplit(".", 1)
            out[f"blocks.{i}.{_BLOCK[ln]}.{sub}.{param}"] = v
        elif mod in _BLOCK:
            out[f"blocks.{i}.{_BLOCK[mod]}.{param}"] = v
        else:
            attn, proj = mod.split(".")
            ours = _FUSED[attn][0]
            fused.setdefault(f"blocks.{i}.{ours}.{param}", {})[proj] = v
    for key, parts in fused.items():
        order = _FUSED["attn1" if ".qkv." in key else "attn2"][1]
        out[key] = torch.cat([parts[p] for p in order])
    if NULL not in sd:
        raise UserError(f"{NULL} missing: the checkpoint has no learned null text (trained without learnable_cf)")
    out["null_context"] = sd[NULL].float()
    rows, k = out["token_emb.weight"].shape[0], out["out.weight"].shape[0]
    if rows != k + 1:  # the content embedding holds the K codes plus [MASK]; to_logits predicts the K codes
        raise UserError(f"official checkpoint: content_emb.emb has {rows} rows but to_logits predicts {k} "
                         f"codes (expected {k + 1} = K + [MASK]); the two come from different pruned codebooks")
    if out["null_context"].shape[-1] != out["blocks.0.kv2.weight"].shape[1]:
        raise UserError(f"official checkpoint: {NULL} has width {out['null_context'].shape[-1]} but the "
                         f"cross-attention reads {out['blocks.0.kv2.weight'].shape[1]}-d text features")
    layers = 1 + max(int(k.split(".")[1]) for k in out if k.startswith("blocks."))
    dim = out["token_emb.weight"].shape[1]
    cfg = TransformerConfig(
        size="debug", num_classes=out["out.weight"].shape[0], height=out["row_emb.weight"].shape[0],
        width=out["col_emb.weight"].shape[0], context_dim=out["blocks.0.kv2.weight"].shape[1],
        context_len=out["null_context"].shape[0], num_timesteps=out["blocks.0.norm1.emb.weight"].shape[0],
        layers=layers, dim=dim, heads=heads, mlp_ratio=out["blocks.0.fc1.weight"].shape[0] / dim)
    return cfg, out


def load_official(path: str | Path, use_ema: bool = True, heads: int = 16) -> tuple[TransformerConfig, dict[str, torch.Tensor]]:
    """Read an official `.pth` (weights only, no code execution) and convert it."""
    ckpt = torch.load(str(path), map_location="cpu", weights_only=True)
    return from_official(merge_ema(ckpt, use_ema), heads)
