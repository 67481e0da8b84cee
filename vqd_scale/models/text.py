"""Frozen open_clip text tower: all per-token features (the cross-attention context) and the pooled embedding.

As in the official VQ-Diffusion `CLIPTextEmbedding(normalize=True, pick_last_embedding=False)` and
diffusers' pipeline: the context is the output of the final LayerNorm for all 77 positions, no
projection, each token feature L2-normalised. Padding is open_clip's (id 0), so padded positions
carry features too, exactly as in training.
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from vqd_scale.compat import import_open_clip
from vqd_scale.config import TextEncoderConfig
from vqd_scale.errors import MissingInput, UserError

LOCAL_DIR = "local-dir:"


def tiny_model_name(cfg: TextEncoderConfig) -> str:
    """Register (once) a tiny open_clip config with cfg's text tower and return its name."""
    open_clip = import_open_clip()
    name = f"vqd-tiny-w{cfg.tiny_width}-l{cfg.tiny_layers}-h{cfg.tiny_heads}-e{cfg.tiny_embed_dim}-c{cfg.context_length}"
    if open_clip.get_model_config(name) is None:
        model_cfg = {
            "embed_dim": cfg.tiny_embed_dim,
            # Smallest real ViT tower open_clip accepts; it is dropped right after construction.
            "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "head_width": 64, "patch_size": 16},
            "text_cfg": {"context_length": cfg.context_length, "vocab_size": 49408,
                         "width": cfg.tiny_width, "heads": cfg.tiny_heads, "layers": cfg.tiny_layers},
        }
        folder = Path(tempfile.mkdtemp(prefix="vqd_openclip_cfg_"))
        (folder / f"{name}.json").write_text(json.dumps(model_cfg))
        open_clip.add_model_config(folder)  # public registry API (scans the folder's *.json)
    return name


def build_clip(cfg: TextEncoderConfig) -> nn.Module:
    """open_clip CLIP with the configured weights; never downloads (hub tags are refused)."""
    open_clip = import_open_clip()
    pre = cfg.pretrained
    if pre and pre.startswith(LOCAL_DIR):
        folder = Path(pre[len(LOCAL_DIR):])
        if not (folder / "open_clip_config.json").is_file():
            raise MissingInput(f"text.pretrained={pre!r}: {folder}/open_clip_config.json not found")
        return open_clip.create_model(pre)
    name = tiny_model_name(cfg) if cfg.model == "tiny" else cfg.model
    if open_clip.get_model_config(name) is None:
        raise UserError(f"text.model={cfg.model!r} is not an open_clip model name (e.g. ViT-B-32) or 'tiny'")
    model = open_clip.create_model(name, pretrained=None)
    if pre:
        if not Path(pre).is_file():
            raise MissingInput(
                f"text.pretrained={pre!r} is not a local file; give a weights file (.pt/.bin/.safetensors) or "
                f"'local-dir:PATH' — hub tags are refused because nothing may download at run time")
        open_clip.load_checkpoint(model, pre)
    return model


class FrozenCLIPTextEncoder(nn.Module):
    """Frozen CLIP text tower: `tokenize`, per-token `forward`, pooled `embed`."""

    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        open_clip = import_open_clip()
        self.cfg = cfg
        clip = build_clip(cfg)
        if not hasattr(clip, "ln_final") or not hasattr(clip, "token_embedding"):
            raise UserError(f"text.model={cfg.model!r} has no built-in text transformer (HF text towers "
                             "are not supported); use an OpenAI-style CLIP such as ViT-B-32")
        clip.visual = nn.Identity()  # only the text tower is used; free the image tower
        self.clip = clip.eval().requires_grad_(False)
        self.width = clip.ln_final.normalized_shape[0]
        self.context_length = clip.positional_embedding.shape[0]
        if self.context_length != cfg.context_length:
            raise UserError(f"text.context_length={cfg.context_length} but the model has {self.context_length}")
        self._tokenizer = open_clip.get_tokenizer(
            cfg.pretrained if (cfg.pretrained or "").startswith(LOCAL_DIR) else
            (tiny_model_name(cfg) if cfg.model == "tiny" else cfg.model),
            context_length=self.context_length)

    def train(self, mode: bool = True) -> "FrozenCLIPTextEncoder":
        """Always stays in eval mode (frozen)."""
        return super().train(False)

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        """Long[B, context_length] CLIP BPE ids (open_clip's bundled vocabulary, offline)."""
        if isinstance(texts, str):
            raise TypeError("tokenize expects a list of strings, got a single str")
        return self._tokenizer(list(texts))

    def _check(self, tokens: torch.Tensor) -> None:
        if tokens.dim() != 2 or tokens.shape[1] != self.context_length:
            raise UserError(f"tokens must be Long[B, {self.context_length}] from tokenize(), got {tuple(tokens.shape)}")

    @torch.no_grad()
    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """F[B, L, width]: per-token features after the final LayerNorm, each L2-normalised."""
        self._check(tokens)
        c = self.clip
        cast = c.transformer.get_cast_dtype()
        x = c.token_embedding(tokens).to(cast) + c.positional_embedding.to(cast)  # [B, L, width]
        x = c.ln_final(c.transformer(x, attn_mask=c.attn_mask))
        return F.normalize(x.float(), dim=-1)

    @torch.no_grad()
    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """F[B, E]: pooled, projected, L2-normalised text embedding (CLIP's text feature)."""
        self._check(tokens)
        return self.clip.encode_text(tokens, normalize=True).float()
