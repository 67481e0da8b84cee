"""CLIP image/text embeddings for pre-extraction (the prior's training pairs), from local weights only."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from vqd_scale.config import TextEncoderConfig
from vqd_scale.errors import UserError

# open_clip's OPENAI_DATASET_MEAN / STD (the statistics every CLIP image tower was trained with)
_MEAN = (0.48145466, 0.4578275, 0.40821073)
_STD = (0.26862954, 0.26130258, 0.27577711)


class ClipEmbedder:
    """Callable (images F[B,3,H,W] in [-1,1], captions) → (image_emb, text_emb) float16 numpy [B,E], L2-normalised."""

    def __init__(self, clip, device: str, description: dict):
        from vqd_scale.compat import import_open_clip

        self.clip = clip.to(device).eval().requires_grad_(False)
        self.device = torch.device(device)
        size = clip.visual.image_size
        self.image_size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
        self.embed_dim = int(clip.text_projection.shape[1]) if hasattr(clip, "text_projection") else None
        self.description = description
        self._tokenize = import_open_clip().get_tokenizer("ViT-B-32")  # CLIP BPE, identical for all OpenAI-style towers

    @classmethod
    def build(cls, model: str, pretrained: Optional[str], device: str, out_dir: str) -> "ClipEmbedder":
        """open_clip model by name (or 'tiny'); a tiny random model is saved to out_dir so later stages can load the same weights."""
        from vqd_scale.models.text import build_clip

        torch.manual_seed(0)  # a random tiny tower must be reproducible, and is saved below anyway
        clip = build_clip(TextEncoderConfig(model=model, pretrained=pretrained))
        if pretrained is None:
            path = Path(out_dir) / f"clip_{model}_random.pt"
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save({"state_dict": clip.state_dict()}, path)
            pretrained = str(path.resolve())
        return cls(clip, device, {"model": model, "pretrained": pretrained})

    @classmethod
    def from_manifest(cls, manifest: dict, device: str, where: str = "the token manifest") -> "ClipEmbedder":
        """The CLIP model a token manifest's embeddings came from (its `embedding_model`: name + local weights)."""
        desc = manifest.get("embedding_model") or {}
        if not desc.get("model"):
            raise UserError(f"{where} records no embedding_model: its shards were extracted without --clip-model")
        from vqd_scale.models.text import build_clip

        clip = build_clip(TextEncoderConfig(model=desc["model"], pretrained=desc.get("pretrained")))
        return cls(clip, device, desc)

    @torch.no_grad()
    def embed_images(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalised image embeddings F[B,E] of images F[B,3,H,W] in [-1,1] (any size: resized here)."""
        x = F.interpolate(images.float().to(self.device), size=self.image_size, mode="bicubic",
                          align_corners=False, antialias=True)
        x = (x + 1) / 2  # [-1,1] → [0,1], then CLIP normalisation
        mean = torch.tensor(_MEAN, device=self.device).view(1, 3, 1, 1)
        std = torch.tensor(_STD, device=self.device).view(1, 3, 1, 1)
        return self.clip.encode_image((x - mean) / std, normalize=True).float()

    @torch.no_grad()
    def embed_texts(self, captions: list[str]) -> torch.Tensor:
        """L2-normalised text embeddings F[B,E] of captions."""
        return self.clip.encode_text(self._tokenize(captions).to(self.device), normalize=True).float()

    def __call__(self, images: torch.Tensor, captions: list[str]) -> tuple[np.ndarray, np.ndarray]:
        img, txt = self.embed_images(images), self.embed_texts(captions)
        return img.cpu().numpy().astype(np.float16), txt.cpu().numpy().astype(np.float16)
