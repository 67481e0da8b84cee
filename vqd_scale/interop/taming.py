"""taming-transformers VQGAN checkpoint (`taming.models.vqgan.VQModel`) → diffusers `VQModel`.

Both are the same network (LDM-style encoder/decoder, nearest-code quantiser); only the key names
differ: `encoder.down.{i}.block.{j}` → `encoder.down_blocks.{i}.resnets.{j}`, `nin_shortcut` →
`conv_shortcut`, attention 1×1 convs `q/k/v/proj_out` → linear `to_q/to_k/to_v/to_out.0`, `mid.block_1`
→ `mid_block.resnets.0`, and the decoder's `up` list is stored lowest resolution last (diffusers'
`up_blocks` lowest first). The discriminator / perceptual loss (`loss.*`) is dropped. Gumbel-quantised
VQGANs pick a code by a learned projection, not the nearest code, which VQModel cannot express:
they are refused by name.
"""
from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch

from vqd_scale.errors import UserError

_RESNET = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "nin_shortcut": "conv_shortcut"}
_ATTN = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}


def load_taming_config(path: str | Path) -> dict:
    """The `model.params` of a taming YAML config (or a YAML holding those params directly)."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.to_container(OmegaConf.load(str(path)), resolve=True)
    params = cfg.get("model", {}).get("params", cfg) if isinstance(cfg, dict) else None
    if not isinstance(params, dict) or "ddconfig" not in params or "n_embed" not in params:
        raise UserError(f"{path}: not a taming VQGAN config (needs model.params with ddconfig, n_embed, embed_dim)")
    return params


def load_taming_state_dict(path: str | Path, trust_pickle: bool = False) -> dict[str, torch.Tensor]:
    """The VQGAN tensors of a taming / Lightning checkpoint (`state_dict`), any wrapper prefix removed."""
    try:
        ckpt = torch.load(str(path), map_location="cpu", weights_only=not trust_pickle)
    except pickle.UnpicklingError as e:
        raise UserError(f"{path} holds pickled objects besides tensors ({str(e).splitlines()[0]}); if you trust "
                         "the file, pass --trust-pickle to load it with full unpickling") from None
    sd = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(sd, dict):
        raise UserError(f"{path}: no state_dict in the checkpoint")
    if any(k.endswith("quantize.proj.weight") or k.endswith("quantize.embed.weight") for k in sd):
        raise UserError(f"{path} is a Gumbel-quantised VQGAN (quantize.proj / quantize.embed): it picks codes by a "
                         "learned projection, not by the nearest code, so a diffusers VQModel cannot express it")
    anchor = next((k for k in sd if k.endswith("quantize.embedding.weight")), None)
    if anchor is None:
        raise UserError(f"{path}: no quantize.embedding.weight; not a taming VQGAN checkpoint")
    prefix = anchor[: -len("quantize.embedding.weight")]  # e.g. "first_stage_model." inside a larger model
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix) and torch.is_tensor(v)}


def vqmodel_config(params: dict) -> dict:
    """diffusers VQModel constructor arguments for taming `model.params`."""
    dd = params["ddconfig"]
    mult, attn = list(dd["ch_mult"]), set(dd.get("attn_resolutions", []))
    if mult[0] != 1:
        raise UserError(f"ch_mult {mult} starts with {mult[0]}: the diffusers encoder's first block has "
                         "block_out_channels[0] channels where taming's has ch; only ch_mult[0] = 1 converts")
    if dd.get("double_z", False):
        raise UserError("ddconfig.double_z is true (a KL autoencoder's encoder), not a VQGAN")
    res, down = dd["resolution"], []
    for _ in mult:  # taming adds attention at levels whose feature side is in attn_resolutions
        down.append("AttnDownEncoderBlock2D" if res in attn else "DownEncoderBlock2D")
        res //= 2
    low = dd["resolution"] // 2 ** (len(mult) - 1)
    up = ["AttnUpDecoderBlock2D" if low * 2 ** i in attn else "UpDecoderBlock2D" for i in range(len(mult))]
    return dict(in_channels=dd["in_channels"], out_channels=dd["out_ch"], down_block_types=tuple(down),
                up_block_types=tuple(up), block_out_channels=tuple(dd["ch"] * m for m in mult),
                layers_per_block=dd["num_res_blocks"], latent_channels=dd["z_channels"],
                num_vq_embeddings=params["n_embed"], vq_embed_dim=params["embed_dim"], norm_num_groups=32,
                sample_size=dd["resolution"])


def _rename(key: str, levels: int) -> str:
    """One taming key → its diffusers name (KeyError-free: unknown keys come back unchanged)."""
    parts = key.split(".")
    side = parts[0]
    if side not in ("encoder", "decoder"):
        return key  # quant_conv, post_quant_conv, quantize.embedding keep their names
    rest = parts[1:]
    if rest[0] in ("norm_out", "conv_in", "conv_out"):
        return ".".join([side, "conv_norm_out" if rest[0] == "norm_out" else rest[0], *rest[1:]])
    if rest[0] == "mid":
        kind, leaf = rest[1], rest[2:]
        if kind == "attn_1":
            return ".".join([side, "mid_block.attentions.0", _ATTN[leaf[0]], *leaf[1:]])
        return ".".join([side, f"mid_block.resnets.{int(kind[-1]) - 1}", _RESNET[leaf[0]], *leaf[1:]])
    level = int(rest[1])
    block = f"down_blocks.{level}" if rest[0] == "down" else f"up_blocks.{levels - 1 - level}"
    kind, leaf = rest[2], rest[3:]
    if kind in ("downsample", "upsample"):
        return ".".join([side, block, f"{kind}rs.0", *leaf])  # downsample.conv → downsamplers.0.conv
    idx, leaf = leaf[0], leaf[1:]
    if kind == "block":
        return ".".join([side, block, f"resnets.{idx}", _RESNET[leaf[0]], *leaf[1:]])
    return ".".join([side, block, f"attentions.{idx}", _ATTN[leaf[0]], *leaf[1:]])


def convert_state_dict(sd: dict[str, torch.Tensor], levels: int) -> dict[str, torch.Tensor]:
    """taming tensors → diffusers VQModel tensors; `loss.*` dropped, attention 1×1 conv kernels flattened."""
    out = {}
    for k, v in sd.items():
        if k.startswith("loss."):
            continue
        new = _rename(k, levels)
        is_attn_proj = ".attentions." in new and new.endswith(".weight") and v.ndim == 4
        out[new] = v[:, :, 0, 0] if is_attn_proj else v  # Conv2d(C, C, 1) [C,C,1,1] → Linear [C,C]
    return out


def vqmodel_from_taming(ckpt: str | Path, config: str | Path, trust_pickle: bool = False) -> Any:
    """Build a diffusers VQModel holding a taming VQGAN's weights; refuses any key that does not fit."""
    from vqd_scale.compat import import_diffusers

    params = load_taming_config(config)
    kwargs = vqmodel_config(params)
    model = import_diffusers().VQModel(**kwargs)
    sd = convert_state_dict(load_taming_state_dict(ckpt, trust_pickle), len(kwargs["block_out_channels"]))
    own = model.state_dict()
    wrong = [f"{k} {tuple(sd[k].shape)} vs {tuple(v.shape)}" for k, v in own.items() if k in sd and sd[k].shape != v.shape]
    missing, extra = sorted(set(own) - set(sd)), sorted(set(sd) - set(own))
    if wrong or missing or extra:
        raise UserError(f"{ckpt} does not fit the VQModel built from {config} (shapes {wrong[:3]}, missing "
                         f"{missing[:3]}, unexpected {extra[:3]}); is the config the checkpoint's own?")
    model.load_state_dict(sd, strict=True)
    return model.eval()
