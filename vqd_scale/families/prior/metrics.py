"""Prior evaluation (DALLE2-pytorch style): cosine of generated image embeddings at several step counts.

For each step count: cos(generated, true image emb), cos(generated, text emb), and the controls
with an unrelated caption (the batch rolled by one): cos(generated from the unrelated caption,
true image emb) and cos(generated, unrelated text emb). A prior that uses its text scores clearly
higher on the first two than on the controls.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from vqd_scale.config import ShiftedDiffusionConfig
from vqd_scale.diffusion.shifted import ShiftedGaussianDiffusion
from vqd_scale.errors import UserError
from vqd_scale.models.prior import PriorModel
from vqd_scale.families.prior.task import sample_embeddings


@torch.no_grad()
def prior_metrics(model: PriorModel, shifted_cfg: ShiftedDiffusionConfig, image_emb: torch.Tensor,
                  text_emb: torch.Tensor, context: Optional[torch.Tensor], steps: Sequence[int] = (8, 64),
                  seed: int = 0, guidance_scale: Optional[float] = None) -> dict[str, float]:
    """{"prior/<metric>@<steps>": value}; key names as DALLE2-pytorch / `eval.metrics` (sim_pred_image, …)."""
    if len(image_emb) < 2:
        raise UserError("prior metrics need a batch of >= 2 pairs (the control rolls the batch)")
    device = next(model.parameters()).device
    diffusion = ShiftedGaussianDiffusion(shifted_cfg).to(device)
    g_scale = shifted_cfg.guidance_scale if guidance_scale is None else guidance_scale
    image_emb, text_emb = image_emb.to(device).float(), text_emb.to(device).float()
    context = None if context is None else context.to(device)
    rolled_text = text_emb.roll(1, 0)  # each pair gets another pair's caption
    rolled_ctx = None if context is None else context.roll(1, 0)
    was_training = model.training
    model.eval()
    out: dict[str, float] = {}
    cos = lambda a, b: F.cosine_similarity(a.float(), b.float(), dim=-1).mean().item()  # noqa: E731
    for n in steps:
        gen = lambda te, ctx: sample_embeddings(  # noqa: E731 (same noise for related and unrelated)
            model, diffusion, te, ctx, n, torch.Generator(device).manual_seed(seed), g_scale, shifted_cfg.clamp_x0)
        pred, pred_u = gen(text_emb, context), gen(rolled_text, rolled_ctx)
        m = {"sim_pred_image": cos(pred, image_emb), "sim_pred_text": cos(pred, text_emb),
             "sim_unrelated_image": cos(pred_u, image_emb), "sim_pred_unrelated_text": cos(pred, rolled_text),
             "sim_text_image": cos(text_emb, image_emb)}
        out.update({f"prior/{k}@{n}": v for k, v in m.items()})
    model.train(was_training)
    return out


@torch.no_grad()
def prior_metrics_from_batch(model: PriorModel, text_encoder, shifted_cfg: ShiftedDiffusionConfig, batch: dict,
                             steps: Sequence[int] = (8, 64), seed: int = 0) -> dict[str, float]:
    """`prior_metrics` on a loader batch: context from the frozen text tower, text_emb stored or computed."""
    if batch.get("image_emb") is None:
        raise UserError("prior metrics need image_emb in the batch; extract the held-out shards with --clip-model "
                         "and set data.with_embeddings=true")
    device = next(model.parameters()).device
    tokens = batch["text_tokens"].to(device).long()
    context = text_encoder(tokens)
    text_emb = batch.get("text_emb")
    text_emb = text_encoder.embed(tokens) if text_emb is None else text_emb
    return prior_metrics(model, shifted_cfg, batch["image_emb"], text_emb, context, steps, seed)
