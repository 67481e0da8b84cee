"""What a user sees of a trained text→image-token model on the synthetic world, as numbers.

Held-out VLB in nats per image token (all T terms, the quantity the training loss estimates) and
attribute accuracy of samples for held-out captions, next to chance (shuffled captions) and the
ceiling (real images through the tokenizer). Used by `tools/demo.py`, `bench/quality.py` and the
learning test, so the three report the same figures.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from vqd_scale.config import SamplerConfig
from vqd_scale.data.synthetic import SyntheticSpec, attribute_accuracy, make_sample
from vqd_scale.diffusion.discrete import MaskAndReplace


@dataclass
class HeldOut:
    """Held-out synthetic captions and their real images (uint8 [n,R,R,3]), never trained on."""
    captions: list[str]
    images: np.ndarray


def synthetic_heldout(n: int, resolution: int, seed: int = 1) -> HeldOut:
    """n (caption, image) pairs of another seed than the training shards (`make_synthetic` uses seed 0)."""
    spec = SyntheticSpec(resolution=resolution, seed=seed)
    pairs = [make_sample(spec, 0, i) for i in range(n)]
    return HeldOut([c for _, c, _ in pairs], np.stack([np.asarray(img) for img, _, _ in pairs]))


def to_unit(images: np.ndarray) -> torch.Tensor:
    """uint8 [n,H,W,3] → F[n,3,H,W] in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1


@torch.no_grad()
def vlb_per_token(model, diffusion: MaskAndReplace, x0: torch.Tensor, context: torch.Tensor,
                  generator: torch.Generator, batch_size: int = 256) -> dict:
    """Σ_t E_q[L_t] in nats per token over held-out tokens x0 Long[n,N] with text context [n,L,Dc].

    One x_t draw per (sample, t). The prior term L_T (< 1e-4 nats for both presets) is left out, as
    in the official code. Returns {"vlb": total, "per_t": [T] mean L_t}.
    """
    model.eval()
    T = diffusion.num_timesteps
    per_t = torch.zeros(T, dtype=torch.float64)
    for t in range(T):
        for i in range(0, len(x0), batch_size):
            xb, cb = x0[i:i + batch_size], context[i:i + batch_size]
            tb = torch.full((len(xb),), t, dtype=torch.long)
            x_t = diffusion.q_sample(xb, tb, generator)
            per_t[t] += diffusion.losses(model(x_t, tb, context=cb).float(), xb, x_t, tb)["vlb"].double().sum()
    per_t /= len(x0)
    return {"vlb": float(per_t.sum()), "per_t": per_t.tolist()}


def sample_accuracy(model, text_encoder, diffusion: MaskAndReplace, tokenizer, held: HeldOut,
                    sampler: SamplerConfig, seed: int = 0, height: Optional[int] = None,
                    width: Optional[int] = None) -> dict:
    """Sample one image per held-out caption; attribute accuracy vs chance and the real-image ceiling.

    Returns {"samples", "chance", "real": {color, shape, position, count, all}, "images": F[n,3,H,W]}.
    """
    from vqd_scale.generate import generate

    gen = torch.Generator().manual_seed(seed)
    ids = generate(model, text_encoder, diffusion, text_encoder.tokenize(held.captions), sampler, generator=gen)
    h, w = height or model.cfg.height, width or model.cfg.width
    images = tokenizer.decode(ids.view(-1, h, w)).float().cpu()  # [n,3,H,W] in [-1,1]
    shuffled = held.captions[1:] + held.captions[:1]  # each image scored against another sample's caption
    return {"samples": attribute_accuracy(held.captions, images), "chance": attribute_accuracy(shuffled, images),
            "real": attribute_accuracy(held.captions, list(held.images)), "images": images}
