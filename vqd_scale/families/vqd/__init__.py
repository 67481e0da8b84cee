"""VQ-Diffusion: text → image tokens (mask-and-replace discrete diffusion, AdaLN transformer)."""
from __future__ import annotations

import dataclasses

from vqd_scale.config import DiscreteDiffusionConfig, TransformerConfig, check
from vqd_scale.families.base import DataNeeds, Family


def validate_vq_sections(cfg, active: bool) -> None:
    """The `model` and `diffusion` sections (shared with the decoder family)."""
    from vqd_scale.diffusion.presets import SCHEDULE_PRESETS, resolve_endpoints
    from vqd_scale.models.transformer import MODEL_SIZES

    d, m = cfg.diffusion, cfg.model
    check(d.preset in (*SCHEDULE_PRESETS, "custom"), "diffusion.preset",
          f"got {d.preset!r}; use one of {sorted(SCHEDULE_PRESETS)} or 'custom' with all four endpoints")
    for k in ("alpha_cum_start", "alpha_cum_end", "gamma_cum_start", "gamma_cum_end"):
        v = getattr(d, k)
        check(v is None or 0.0 <= v <= 1.0, f"diffusion.{k}", f"got {v}; must be in [0, 1]")
    check(0.0 <= d.caption_dropout < 1.0, "diffusion.caption_dropout", "must be in [0, 1)")
    check(d.num_timesteps >= 2, "diffusion.num_timesteps", "must be >= 2")
    try:
        resolve_endpoints(d.preset, d.alpha_cum_start, d.alpha_cum_end, d.gamma_cum_start, d.gamma_cum_end)
    except ValueError as e:
        check(False, "diffusion.preset", str(e))
    check(d.aux_weight >= 0, "diffusion.aux_weight", "must be >= 0")
    check(d.importance_min_count >= 0, "diffusion.importance_min_count", "must be >= 0")
    check(0.0 <= d.importance_ema < 1.0, "diffusion.importance_ema", "must be in [0, 1)")
    check(m.size in MODEL_SIZES, "model.size", f"got {m.size!r}; use one of {', '.join(MODEL_SIZES)}")
    for key in ("layers", "dim", "heads"):
        v = getattr(m, key)
        check(v is None or v >= 1, f"model.{key}", f"got {v}; must be >= 1 (or unset for the size's value)")
    check(m.num_classes >= 0, "model.num_classes", "must be >= 0 (0 = take K from the token manifest)")
    check(m.height >= 1 and m.width >= 1, "model.height", "height and width (token grid) must be >= 1")
    check(m.mlp_ratio is None or m.mlp_ratio > 0, "model.mlp_ratio", "must be > 0 (or null for the size's)")
    check(0.0 <= m.dropout < 1.0, "model.dropout", "must be in [0, 1)")
    check(m.context_len >= 1 and m.context_dim >= 1, "model.context_dim", "context_dim/context_len must be >= 1")
    check(m.num_timesteps == d.num_timesteps, "model.num_timesteps",
          f"must equal diffusion.num_timesteps ({d.num_timesteps})")
    if active:
        check(cfg.text.context_length == m.context_len, "text.context_length",
              f"must equal model.context_len ({m.context_len}): every text token feature is a context row")
        check(cfg.eval.sampler.steps <= d.num_timesteps, "eval.sampler.steps",
              f"must be <= diffusion.num_timesteps ({d.num_timesteps})")


def resolve_tokens(cfg):
    """model.num_classes (K) from the token manifests, which must agree; their grid must be the model's."""
    from vqd_scale.data.schema import manifest_of_sources

    m, where = manifest_of_sources(cfg.data)
    if m is None:
        check(cfg.model.num_classes >= 2, "model.num_classes",
              "is 0 and no token manifest was found (no shard of data.sources exists and data.manifest is unset): "
              "point data.sources at shards written by vqd-extract (manifest.json lies beside them), or set "
              "model.num_classes explicitly")
        return cfg
    K, (h, w) = int(m["num_classes"]), m["token_shape"]
    check(cfg.model.num_classes in (0, K), "model.num_classes",
          f"is {cfg.model.num_classes} but the token manifest {where} says K={K}; set model.num_classes=0 to take "
          "it from the manifest")
    check((cfg.model.height, cfg.model.width) == (h, w), "model.height",
          f"model.height/width = {cfg.model.height}x{cfg.model.width} but the tokens are {h}x{w}; set "
          f"model.height={h} model.width={w}")
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, num_classes=K))


def init_hint(cfg, sidecar) -> str:
    """The model.* settings that make this run's model the one `vqd-export import` wrote beside the weights."""
    from omegaconf import OmegaConf

    from vqd_scale.models.transformer import resolve_size
    theirs = TransformerConfig(**OmegaConf.to_container(OmegaConf.load(sidecar))["model"])

    def fields(m: TransformerConfig) -> dict:  # the fields that decide tensor shapes, sizes resolved
        return {**dataclasses.asdict(resolve_size(m)), **{k: getattr(m, k) for k in (
            "num_classes", "height", "width", "context_dim", "context_len", "num_timesteps")}}
    ours, want = fields(cfg.model), fields(theirs)
    fix = " ".join(f"model.{k}={v}" for k, v in want.items() if ours[k] != v)
    return f"set {fix} (from {sidecar}, written by vqd-export import)" if fix else f"compare with {sidecar}"


def _build_task(cfg, device):
    from vqd_scale.families.vqd.task import VQDTask
    return VQDTask(cfg.model, cfg.diffusion, cfg.text, device)


def _evaluator(cfg, run_dir, ranks, heldout):
    from vqd_scale.families.vqd.evaluate import VQDEvaluator
    return VQDEvaluator(cfg, run_dir, ranks, heldout)


def _export(out, state_dict, cfg, text_encoder, image_tokenizer):
    from vqd_scale.interop.pipeline import export_pipeline
    return export_pipeline(out, state_dict, cfg.model, cfg.diffusion, text_encoder, image_tokenizer)


def _sampler(cfg, weights, device, load_text):
    from vqd_scale.families.vqd.sample import VQDSampler
    return VQDSampler(cfg, weights, device, load_text)


FAMILY = Family(
    name="vqd",
    summary="VQ-Diffusion: caption → image tokens (frozen CLIP text features in cross-attention)",
    sections={"model": TransformerConfig, "diffusion": DiscreteDiffusionConfig},
    needs=DataNeeds(embeddings=False, captions="required"),
    validate=validate_vq_sections,
    resolve=resolve_tokens,
    dropout=lambda cfg: {"text": cfg.diffusion.caption_dropout},
    build_task=_build_task,
    evaluator=_evaluator,
    sampler=_sampler,
    export=_export,
    init_hint=init_hint,
)
