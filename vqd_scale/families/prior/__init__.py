"""Shifted-diffusion prior (Corgi): caption → CLIP image embedding, starting from a text-chosen Gaussian."""
from __future__ import annotations

from vqd_scale.config import PriorConfig, ShiftedDiffusionConfig, check
from vqd_scale.families.base import DataNeeds, Family


def validate_prior_sections(cfg, active: bool) -> None:
    """The `prior` and `shifted` sections."""
    from vqd_scale.models.prior import PRIOR_SIZES

    s, p = cfg.shifted, cfg.prior
    check(0.0 < s.beta_start < s.beta_end < 1.0, "shifted.beta_start", "need 0 < beta_start < beta_end < 1")
    check(s.kappa > 0, "shifted.kappa", "must be > 0")
    check(s.num_timesteps >= 2, "shifted.num_timesteps", "must be >= 2")
    check(1 <= s.sample_steps <= s.num_timesteps, "shifted.sample_steps",
          f"got {s.sample_steps}; must be in [1, shifted.num_timesteps={s.num_timesteps}]")
    check(s.sample_variance in ("large", "small"), "shifted.sample_variance",
          f"got {s.sample_variance!r}; use 'large' (β_t Σ, released) or 'small' (posterior β̃_t Σ)")
    check(0.0 <= s.text_dropout < 1.0, "shifted.text_dropout", "must be in [0, 1)")
    check(s.mixture_lr_scale > 0, "shifted.mixture_lr_scale", "must be > 0")
    check(s.num_aux_draws >= 1, "shifted.num_aux_draws", "must be >= 1")
    check(s.p2_target in ("x0", "eps"), "shifted.p2_target", f"got {s.p2_target!r}; use 'x0' (as released) or 'eps'")
    check(s.guidance_scale >= 0, "shifted.guidance_scale", "must be >= 0 (1 = no guidance)")
    check(p.size in PRIOR_SIZES, "prior.size", f"got {p.size!r}; use one of {', '.join(PRIOR_SIZES)}")
    for key in ("layers", "dim", "heads"):
        v = getattr(p, key)
        check(v is None or v >= 1, f"prior.{key}", f"got {v}; must be >= 1 (or unset for the size's value)")
    check(p.num_components >= 1, "prior.num_components", "must be >= 1 (the k of the mixture)")
    check(p.embed_scale is None or p.embed_scale > 0, "prior.embed_scale",
          "must be > 0 (or null for √embed_dim, per-dim RMS 1)")
    check(p.embed_dim >= 1 and p.context_dim >= 1 and p.context_len >= 1, "prior.embed_dim",
          "embed_dim, context_dim and context_len must be >= 1")
    if active:
        check(max(cfg.eval.prior_steps) <= s.num_timesteps, "eval.prior_steps",
              f"step counts must be <= shifted.num_timesteps={s.num_timesteps}")


def resolve_embeddings(cfg):
    """The manifests' CLIP embedding width must be prior.embed_dim (nothing is filled in)."""
    from vqd_scale.data.schema import manifest_of_sources

    m, where = manifest_of_sources(cfg.data)
    if m is not None and m.get("embed_dim") is not None:
        check(int(m["embed_dim"]) == cfg.prior.embed_dim, "prior.embed_dim",
              f"is {cfg.prior.embed_dim} but the shards hold {m['embed_dim']}-d CLIP embeddings ({where}); "
              f"set prior.embed_dim={m['embed_dim']}")
    return cfg


def _build_task(cfg, device):
    from vqd_scale.families.prior.task import PriorTask
    return PriorTask(cfg.prior, cfg.shifted, cfg.text, device)


def _evaluator(cfg, run_dir, ranks, heldout):
    from vqd_scale.families.prior.evaluate import PriorEvaluator
    return PriorEvaluator(cfg, run_dir, ranks, heldout)


def _sampler(cfg, weights, device, load_text):
    from vqd_scale.families.prior.sample import PriorSampler
    return PriorSampler(cfg, weights, device, load_text)


FAMILY = Family(
    name="prior",
    summary="shifted-diffusion prior (Corgi): caption → CLIP image embedding",
    sections={"prior": PriorConfig, "shifted": ShiftedDiffusionConfig},
    needs=DataNeeds(embeddings=True, captions="required"),
    validate=validate_prior_sections,
    resolve=resolve_embeddings,
    dropout=lambda cfg: {"text": cfg.shifted.text_dropout},
    build_task=_build_task,
    evaluator=_evaluator,
    sampler=_sampler,
)
