"""Export our weights as a diffusers `VQDiffusionPipeline` directory, and import such a directory back.

The exported VQ-VAE has the pruned codebook (rows `keep` of the full one), so the pipeline's
`quantize.get_codebook_entry(compact_ids)` decodes our compact ids directly. The scheduler gets the
run's schedule endpoints; the learned null text goes to `LearnedClassifierFreeSamplingEmbeddings`.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch

from vqd_scale.compat import import_diffusers
from vqd_scale.config import DiscreteDiffusionConfig, TransformerConfig
from vqd_scale.diffusion.presets import resolve_endpoints
from vqd_scale.errors import MissingInput, UserError
from vqd_scale.interop.clip_hf import to_hf_text_model, write_hf_tokenizer
from vqd_scale.interop.diffusers import NULL_KEY, from_diffusers, split_null, to_diffusers
from vqd_scale.models.text import FrozenCLIPTextEncoder

LearnedEmbModule = "diffusers.pipelines.deprecated.vq_diffusion.pipeline_vq_diffusion"


def _diffusers():
    diffusers = import_diffusers()
    from diffusers.pipelines.deprecated.vq_diffusion.pipeline_vq_diffusion import (
        LearnedClassifierFreeSamplingEmbeddings,
    )
    return diffusers, LearnedClassifierFreeSamplingEmbeddings


def with_num_classes(cfg: TransformerConfig, sd: dict[str, torch.Tensor]) -> TransformerConfig:
    """cfg with num_classes taken from the weights when the run config left it 0 (from the manifest)."""
    k = int(sd["out.weight"].shape[0])
    if cfg.num_classes not in (0, k):
        raise UserError(f"model.num_classes={cfg.num_classes} but the weights predict {k} classes")
    import dataclasses
    return dataclasses.replace(cfg, num_classes=k)


def scheduler_for(diffusion_cfg: DiscreteDiffusionConfig, num_classes: int):
    """diffusers `VQDiffusionScheduler` with our schedule endpoints."""
    diffusers, _ = _diffusers()
    a0, a1, g0, g1 = resolve_endpoints(diffusion_cfg.preset, diffusion_cfg.alpha_cum_start,
                                       diffusion_cfg.alpha_cum_end, diffusion_cfg.gamma_cum_start,
                                       diffusion_cfg.gamma_cum_end)
    return diffusers.VQDiffusionScheduler(num_vec_classes=num_classes + 1,
                                          num_train_timesteps=diffusion_cfg.num_timesteps,
                                          alpha_cum_start=a0, alpha_cum_end=a1, gamma_cum_start=g0, gamma_cum_end=g1)


def pruned_vqmodel(vqmodel, keep: torch.Tensor):
    """A copy of a diffusers VQModel whose codebook holds only rows `keep` (compact id i = row keep[i])."""
    diffusers, _ = _diffusers()
    config = {k: v for k, v in dict(vqmodel.config).items() if not k.startswith("_")}
    config["num_vq_embeddings"] = int(keep.numel())
    pruned = diffusers.VQModel(**config)
    sd = dict(vqmodel.state_dict())
    sd["quantize.embedding.weight"] = sd["quantize.embedding.weight"][keep.to(sd["quantize.embedding.weight"].device)]
    pruned.load_state_dict(sd, strict=True)
    return pruned.eval()


def build_pipeline(model_sd: dict[str, torch.Tensor], model_cfg: TransformerConfig,
                   diffusion_cfg: DiscreteDiffusionConfig, text_encoder: FrozenCLIPTextEncoder, image_tokenizer,
                   tokenizer_dir: str | Path):
    """An in-memory `VQDiffusionPipeline` equal to our model + text tower + image tokenizer."""
    diffusers, LearnedEmb = _diffusers()
    model_cfg = with_num_classes(model_cfg, model_sd)
    if not hasattr(image_tokenizer, "model"):
        raise UserError("the pipeline needs a VQModel image tokenizer (diffusers VQModel); k-means "
                         "tokenizers have no diffusers equivalent")
    if image_tokenizer.num_classes != model_cfg.num_classes:
        raise UserError(f"image tokenizer has K={image_tokenizer.num_classes} codes, the model "
                         f"{model_cfg.num_classes}: export with the tokenizer the model was trained on")
    if text_encoder.width != model_cfg.context_dim:
        raise UserError(f"text width {text_encoder.width} != model.context_dim {model_cfg.context_dim}")
    conf, dsd = to_diffusers(model_sd, model_cfg)
    transformer = diffusers.Transformer2DModel(**conf)
    tsd, null = split_null(dsd)
    transformer.load_state_dict(tsd, strict=True)
    learned = LearnedEmb(learnable=True, hidden_size=null.shape[1], length=null.shape[0])
    learned.embeddings.data.copy_(null)
    return diffusers.VQDiffusionPipeline(
        vqvae=pruned_vqmodel(image_tokenizer.model, image_tokenizer.keep),
        text_encoder=to_hf_text_model(text_encoder.clip),
        tokenizer=write_hf_tokenizer(tokenizer_dir, text_encoder.context_length),
        transformer=transformer.eval(), scheduler=scheduler_for(diffusion_cfg, model_cfg.num_classes),
        learned_classifier_free_sampling_embeddings=learned)


def export_pipeline(out_dir: str | Path, model_sd, model_cfg, diffusion_cfg, text_encoder, image_tokenizer) -> Path:
    """Write a directory that `VQDiffusionPipeline.from_pretrained(out_dir)` loads offline."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pipe = build_pipeline(model_sd, model_cfg, diffusion_cfg, text_encoder, image_tokenizer, out / "tokenizer")
    pipe.save_pretrained(str(out), safe_serialization=True)
    # diffusers records the null-embedding class as library "vq_diffusion", which no longer resolves
    # since the pipeline moved under pipelines.deprecated; its full module path does resolve (the
    # module is imported together with VQDiffusionPipeline, before components are loaded).
    index_file = out / "model_index.json"
    index = json.loads(index_file.read_text())
    index["learned_classifier_free_sampling_embeddings"] = [LearnedEmbModule, "LearnedClassifierFreeSamplingEmbeddings"]
    index_file.write_text(json.dumps(index, indent=2))
    return out


def import_pipeline_dir(path: str | Path, context_len: Optional[int] = None
                        ) -> tuple[TransformerConfig, dict[str, torch.Tensor]]:
    """A diffusers VQ-Diffusion directory (pipeline or bare transformer) → (our config, our state dict)."""
    diffusers, LearnedEmb = _diffusers()
    p = Path(path)
    tdir = p / "transformer" if (p / "transformer").is_dir() else p
    if not (tdir / "config.json").is_file():
        raise MissingInput(f"{tdir}/config.json not found: not a diffusers pipeline or transformer directory")
    transformer = diffusers.Transformer2DModel.from_pretrained(str(tdir))
    dsd = dict(transformer.state_dict())
    edir = p / "learned_classifier_free_sampling_embeddings"
    if edir.is_dir():
        learned = LearnedEmb.from_pretrained(str(edir))
        if not learned.learnable:
            raise UserError(f"{edir}: null embedding is not learnable (the fp16 hub revision lacks it); "
                             "use a checkpoint that has the learned embedding")
        dsd[NULL_KEY] = learned.embeddings.detach()
    else:
        raise MissingInput(f"{edir} not found: the learned null text embedding is needed for guidance")
    return from_diffusers(dict(transformer.config), dsd)
