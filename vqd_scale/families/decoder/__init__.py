"""Corgi decoder: CLIP image embedding (+ optional caption) → image tokens; trains on image-only data too."""
from __future__ import annotations

from vqd_scale.config import DecoderConfig, DiscreteDiffusionConfig, TransformerConfig, check
from vqd_scale.families.base import DataNeeds, Family
from vqd_scale.families.vqd import resolve_tokens

GUIDANCE_DROPS = ("image", "text", "both")


def validate_decoder_section(cfg, active: bool) -> None:
    """The `decoder` section (`model` and `diffusion` are the vqd family's, checked there)."""
    d = cfg.decoder
    check(d.embed_dim >= 1, "decoder.embed_dim", "must be >= 1 (the CLIP embedding width of the shards)")
    check(d.image_tokens >= 1, "decoder.image_tokens", "must be >= 1 (context rows the embedding becomes)")
    check(0.0 <= d.drop_image < 1.0, "decoder.drop_image", "must be in [0, 1)")
    check(0.0 <= d.drop_text < 1.0, "decoder.drop_text", "must be in [0, 1)")
    check(d.perturb_alpha >= 0, "decoder.perturb_alpha", "must be >= 0 (0 = no perturbation)")
    check(d.guidance_drops in GUIDANCE_DROPS, "decoder.guidance_drops", f"got {d.guidance_drops!r}; use one of "
          f"{GUIDANCE_DROPS}")
    if active:
        m = cfg.model
        check(d.with_text or d.guidance_drops != "text", "decoder.guidance_drops",
              "is 'text' but decoder.with_text=false: there is no text to guide on; use 'image'")
        if d.with_text:
            check(cfg.text.context_length == m.context_len, "text.context_length",
                  f"must equal model.context_len ({m.context_len}) when decoder.with_text=true")
        check(cfg.eval.sampler.steps <= cfg.diffusion.num_timesteps, "eval.sampler.steps",
              f"must be <= diffusion.num_timesteps ({cfg.diffusion.num_timesteps})")


def resolve(cfg):
    """K and the token grid from the manifests (as vqd); their CLIP embedding width must be decoder.embed_dim."""
    from vqd_scale.data.schema import manifest_of_sources

    cfg = resolve_tokens(cfg)
    m, where = manifest_of_sources(cfg.data)
    if m is not None:
        check(m.get("embed_dim") is not None, "data.sources",
              f"the decoder trains on CLIP image embeddings but {where} has none; extract with --clip-model")
        check(int(m["embed_dim"]) == cfg.decoder.embed_dim, "decoder.embed_dim",
              f"is {cfg.decoder.embed_dim} but the shards hold {m['embed_dim']}-d CLIP embeddings ({where}); "
              f"set decoder.embed_dim={m['embed_dim']}")
    return cfg


def _build_task(cfg, device):
    from vqd_scale.families.decoder.task import DecoderTask
    return DecoderTask(cfg.model, cfg.diffusion, cfg.decoder, cfg.text, device)


def _evaluator(cfg, run_dir, ranks, heldout):
    from vqd_scale.families.decoder.evaluate import DecoderEvaluator
    return DecoderEvaluator(cfg, run_dir, ranks, heldout)


def _sampler(cfg, weights, device, load_text):
    from vqd_scale.families.decoder.sample import DecoderSampler
    return DecoderSampler(cfg, weights, device, load_text)


FAMILY = Family(
    name="decoder",
    summary="Corgi decoder: CLIP image embedding (+ optional caption) → image tokens (VQ-Diffusion)",
    sections={"model": TransformerConfig, "diffusion": DiscreteDiffusionConfig, "decoder": DecoderConfig},
    needs=DataNeeds(embeddings=True, captions="optional"),
    validate=validate_decoder_section,
    resolve=resolve,
    dropout=lambda cfg: {"text": cfg.decoder.drop_text, "image": cfg.decoder.drop_image},
    build_task=_build_task,
    evaluator=_evaluator,
    sampler=_sampler,
    plan_context=lambda cfg: (cfg.decoder.image_tokens + (cfg.model.context_len if cfg.decoder.with_text else 0),
                              cfg.decoder.with_text),
    notes={"data": "image-only records train too (null text); the prior of the chain is a `task: prior` run",
           "sample": "vqd-sample --prior RUN --decoder RUN --prompt ... | --decoder RUN --image PATH"},
)
