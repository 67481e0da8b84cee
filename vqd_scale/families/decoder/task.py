"""Corgi decoder training task: CLIP image embedding (+ optional text) → image tokens, VQ-Diffusion's loss."""
from __future__ import annotations

import dataclasses

import torch

from vqd_scale.config import DecoderConfig, DiscreteDiffusionConfig, TextEncoderConfig, TransformerConfig
from vqd_scale.diffusion.discrete import ImportanceSampler, MaskAndReplace
from vqd_scale.errors import UserError
from vqd_scale.families.base import batch_image_emb
from vqd_scale.families.vqd.task import VQDTask
from vqd_scale.models.decoder import ImageConditionedTransformer, perturb
from vqd_scale.models.flops import frozen_text_flops, vqd_flops
from vqd_scale.models.transformer import resolve_size

ARCH_KEYS = ("embed_dim", "image_tokens", "with_text")  # the decoder fields that decide tensor shapes


def model_config(model_cfg: TransformerConfig, dcfg: DecoderConfig) -> dict:
    """What resume, eval and sampling compare: another architecture is refused, other dropout is not."""
    return {"model": dataclasses.asdict(model_cfg), "decoder": {k: getattr(dcfg, k) for k in ARCH_KEYS}}


class DecoderTask(VQDTask):
    """Loss of one micro-batch of (image tokens, CLIP image embedding[, caption]); importance sampler as VQD's."""

    def __init__(self, model_cfg: TransformerConfig, diffusion_cfg: DiscreteDiffusionConfig, dcfg: DecoderConfig,
                 text_cfg: TextEncoderConfig, device: torch.device):
        from vqd_scale.models.text import FrozenCLIPTextEncoder

        self.device, self.dcfg = device, dcfg
        self.text = None
        if dcfg.with_text:
            self.text = FrozenCLIPTextEncoder(text_cfg).to(device).eval().requires_grad_(False)
            if self.text.width != model_cfg.context_dim:
                raise UserError(f"model.context_dim={model_cfg.context_dim} but the text tower's width is "
                                f"{self.text.width}; set model.context_dim={self.text.width}")
        self.module = ImageConditionedTransformer(model_cfg, dcfg)
        if dcfg.embed_stats:  # the checkpoint carries them from here on (frozen parameters): read once, at training
            from vqd_scale.data.clusters import load_clusters
            stats = load_clusters(dcfg.embed_stats)
            if stats["means"].shape[0] != 1:
                raise UserError(f"decoder.embed_stats={dcfg.embed_stats} holds {stats['means'].shape[0]} components; "
                                "fit it with tools/fit_prior_clusters.py --k 1 (the data's mean and per-dim std)")
            self.module.load_embed_stats(stats["means"][0].float(), stats["stds"][0].float())
        self.model_config = model_config(model_cfg, dcfg)
        self.diffusion = MaskAndReplace(diffusion_cfg, model_cfg.num_classes).to(device)
        self.sampler = ImportanceSampler(diffusion_cfg.num_timesteps, diffusion_cfg)
        size, n = resolve_size(model_cfg), model_cfg.height * model_cfg.width
        self.tokens_per_sample = n
        ctx_len = dcfg.image_tokens + (model_cfg.context_len if dcfg.with_text else 0)
        self.flops = vqd_flops(size.layers, size.dim, size.mlp_ratio, n, ctx_len, model_cfg.context_dim,
                               model_cfg.num_classes, model_cfg.activation_checkpointing,
                               frozen_text_flops(self.text) if self.text is not None else 0.0)
        self.flops_per_sample = self.flops.model

    def loss(self, module, batch: dict, generator: torch.Generator) -> tuple[torch.Tensor, dict]:
        """VLB + aux of the tokens given the (perturbed, per-sample dropped) embedding and caption."""
        emb = batch_image_emb(batch, self.device, self.dcfg.embed_dim, "decoder", "decoder.embed_dim",
                              "extract the shards with --clip-model (img.emb.npy)")
        emb = perturb(emb, self.dcfg.perturb_alpha, generator)
        B = emb.shape[0]
        # the loader draws both dropouts (exact resume); a batch without them (a hand-made one) drops nothing
        no = torch.zeros(B, dtype=torch.bool, device=self.device)
        drop_image = batch.get("drop_image", no).to(self.device).bool()
        drop_text = batch.get("drop_text", no).to(self.device).bool()
        context = None
        if self.text is not None:
            with torch.no_grad():
                context = self.text(batch["text_tokens"].to(self.device, non_blocking=True))
        loss, metrics = self.discrete_loss(batch, generator, lambda x_t, t: module(
            x_t, t, image_emb=emb, context=context, drop_image=drop_image, drop_text=drop_text))
        metrics["drop_image_frac"] = drop_image.float().mean()
        if "captioned" in batch:
            metrics["captioned_frac"] = batch["captioned"].float().mean().to(self.device)
        return loss, metrics
