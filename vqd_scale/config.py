"""Typed configs: one dataclass per component, YAML files, dotted CLI overrides, validation.

Parsing and merging is OmegaConf's (structured configs type-check every key and name it in the
error); `validate()` adds the value checks OmegaConf cannot express. Components receive only
their own dataclass, never the whole `RunConfig`.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from vqd_scale.errors import ConfigError  # noqa: F401  (re-exported: the config layer's error)


@dataclass
class TextEncoderConfig:
    """Frozen open_clip text tower: a registered model name, or `tiny` for tests/demo."""
    model: str = "ViT-B-32"
    pretrained: Optional[str] = None  # local weights file / directory; never a hub tag
    context_length: int = 77
    # Used only when model == "tiny" (random init, tests and the CPU demo).
    tiny_width: int = 64
    tiny_layers: int = 2
    tiny_heads: int = 2
    tiny_embed_dim: int = 32


@dataclass
class TransformerConfig:
    """VQ-Diffusion AdaLN transformer; `size` picks a registry entry, explicit fields override it."""
    size: str = "debug"
    num_classes: int = 0  # K, non-mask codes; 0 = take it from the data manifest
    height: int = 32
    width: int = 32
    context_dim: int = 512  # per-token text feature width (the text tower's width)
    context_len: int = 77
    num_timesteps: int = 100
    layers: Optional[int] = None
    dim: Optional[int] = None
    heads: Optional[int] = None
    mlp_ratio: Optional[float] = None  # None = the size's ratio (4, or 16 for S: see models/transformer.py)
    dropout: float = 0.0
    activation_checkpointing: bool = False


@dataclass
class DiscreteDiffusionConfig:
    """Mask-and-replace schedule (`released` or `paper` preset, or explicit endpoints) and loss."""
    preset: str = "released"
    num_timesteps: int = 100
    alpha_cum_start: Optional[float] = None
    alpha_cum_end: Optional[float] = None
    gamma_cum_start: Optional[float] = None
    gamma_cum_end: Optional[float] = None
    aux_weight: float = 5e-4  # λ of the auxiliary x0 loss (weighted by 2 − t/T)
    importance_sampling: bool = True
    importance_min_count: int = 10
    importance_ema: float = 0.9  # weight kept on history when updating EMA(L_t^2)
    caption_dropout: float = 0.1  # fraction of captions replaced by the learned null embedding


@dataclass
class SamplerConfig:
    """How to generate: steps (net evaluations, t = T−1 … 0 evenly spaced), guidance, truncation, purity."""
    steps: int = 100
    guidance_scale: float = 1.0
    truncation_rate: float = 1.0
    purity: bool = False
    purity_temperature: float = 0.0  # r in softmax((1 + r·purity)·log p̃)
    batch_size: int = 8


@dataclass
class PriorConfig:
    """Shifted-diffusion prior transformer (Corgi)."""
    size: str = "debug"
    embed_dim: int = 32  # CLIP image/text embedding width
    context_dim: int = 64
    context_len: int = 77
    layers: Optional[int] = None
    dim: Optional[int] = None
    heads: Optional[int] = None
    num_components: int = 1
    activation_checkpointing: bool = False
    # The prior trains and samples in z = embed_scale · e, e the stored L2-normalised CLIP embedding.
    # None = √embed_dim (per-dim RMS 1, DALLE2-pytorch's l2norm·√d): data on the scale of the unit DDPM noise
    # and of the release's raw CLIP embeddings, so its loss, clip and lr mean what they meant there.
    embed_scale: Optional[float] = None


@dataclass
class DecoderConfig:
    """Corgi decoder: how a CLIP image embedding (and optionally text) conditions the VQ-Diffusion transformer."""
    embed_dim: int = 32  # CLIP image embedding width (the shards' img.emb, the prior's output)
    image_tokens: int = 4  # cross-attention context tokens the embedding is projected to (unCLIP / Karlo: 4)
    with_text: bool = False  # text features beside the embedding in cross-attention (null text when dropped)
    drop_image: float = 0.1  # per-sample replacement by the learned null embedding (CFG on the image)
    drop_text: float = 0.5  # per-sample caption dropout (unCLIP 0.5, Karlo 0.3); uncaptioned images always drop
    perturb_alpha: float = 0.0  # training-time e' = normalize(e + α·ε/‖ε‖) (CLIP-VQDiffusion 0.25/0.5); 0 = off
    guidance_drops: str = "both"  # which conditions CFG's unconditional branch nulls: image | text | both
    # .safetensors of tools/fit_prior_clusters.py --k 1 (the embeddings' mean and per-dim std): e is standardised
    # by them before the projections (their common direction removed); None = e as stored
    embed_stats: Optional[str] = None


@dataclass
class ShiftedDiffusionConfig:
    """Shifted Gaussian diffusion: linear β, mixture start N(μ_c, (κσ_c)²)."""
    num_timesteps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02
    kappa: float = 5.0
    shifted: bool = True  # False = plain DDPM (μ = 0, Σ = I), the ablation baseline
    clusters: Optional[str] = None  # .safetensors written by tools/fit_prior_clusters.py
    learnable_mixture: bool = False
    mixture_lr_scale: float = 0.01
    p2_weighting: bool = True
    # the loss the P2 weight 1/(1 + SNR_t) applies to: "x0" = the ẑ0 MSE, as released (Corgi kept P2's code
    # but predicts x0); "eps" = the ε MSE, as P2 is defined (Choi et al. 2022), i.e. ᾱ_t on the ẑ0 MSE
    p2_target: str = "x0"
    clamp_x0: bool = False
    text_dropout: float = 0.1
    sample_steps: int = 64
    sample_variance: str = "large"  # large = β_t Σ (as released) | small = posterior β̃_t Σ
    guidance_scale: float = 1.0  # classifier-free guidance on ẑ_0 (1 = off)
    num_aux_draws: int = 16  # draws of μ_c + κσ_c ε in the learnable-mixture cosine loss


@dataclass
class SourceConfig:
    """One token-shard source, e.g. laion or cc15m, mixed by weight."""
    name: str = "synthetic"
    shards: str = ""  # braceexpand pattern of token shards
    weight: float = 1.0


@dataclass
class DataConfig:
    """Streaming token-shard loader (semantics: docs/data-format.md)."""
    sources: list[SourceConfig] = field(default_factory=lambda: [SourceConfig()])
    manifest: Optional[str] = None  # token manifest; None = manifest.json beside each source's shards
    tokenizer_id: Optional[str] = None  # when set, the manifest's tokenizer id must equal it
    batch_size: int = 8  # per rank, per micro-step
    num_workers: int = 2  # DataLoader workers = deterministic streams per rank (resume needs the same number)
    resampled: bool = True  # draw shards with replacement; False = split shards over ranks × workers
    epoch_samples: int = 10000  # samples per virtual epoch, over all ranks
    with_embeddings: bool = False
    shuffle_buffer: int = 1000  # within-shard shuffle block (samples); 0 = shard order
    seed: int = 0
    timeout_s: float = 600.0  # a worker silent this long raises instead of hanging the job
    max_consecutive_failures: int = 1000  # this many invalid records in a row raise ("all filtered out")


@dataclass
class OptimConfig:
    """AdamW with warm-up and decay defined in samples seen (independent of GPU count)."""
    lr: float = 4.5e-4
    betas: tuple[float, float] = (0.9, 0.96)
    eps: float = 1e-8
    weight_decay: float = 4.5e-2
    grad_clip: float = 0.5
    warmup_samples: int = 1000
    decay: str = "cosine"  # cosine | constant | linear
    min_lr_ratio: float = 0.1
    ema_decay: float = 0.99
    ema_every: int = 25


@dataclass
class DeepSpeedConfig:
    """ZeRO stage, precision, gradient communication; see docs/performance.md (GPU notes)."""
    zero_stage: int = 2
    # auto = bf16 on a GPU with native bf16 (compute capability >= 8), fp16 with dynamic loss scaling on
    # older GPUs, fp32 on CPU | fp32 | bf16 | fp16 (GPU only)
    precision: str = "auto"
    grad_accum: int = 1  # micro-steps per optimizer step; with bf16/fp16 they are accumulated in fp32
    # dtype of the gradient reduction over ranks: fp32 (sums of many bf16 gradients lose bits; 2x the
    # traffic of bf16) | model (the training precision, half the traffic)
    communication_dtype: str = "fp32"
    offload_optimizer: bool = False
    # ZeRO communication buckets (elements). DeepSpeed's default 5e8 allocates a 2 GB fp32 buffer per
    # rank under ZeRO-3 whatever the model size; 5e7 keeps it at 200 MB (fp32) / 100 MB (bf16).
    bucket_elements: int = 50_000_000


@dataclass
class CheckpointConfig:
    """Periodic and on-signal checkpoints, retention, resume."""
    every_steps: int = 500
    every_minutes: float = 30.0
    keep_last: int = 3
    milestone_every: int = 0  # 0 = no milestones
    resume: str = "auto"  # auto | none | a checkpoint path
    init_from: Optional[str] = None  # weights only (consolidated safetensors / imported)


@dataclass
class EvalConfig:
    """Separately scheduled evaluation of each new complete checkpoint."""
    shards: str = ""  # held-out token shards (braceexpand; `::` joins several patterns)
    num_samples: int = 64
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    metrics: list[str] = field(default_factory=lambda: ["fid", "clip_score"])  # + "attributes" (synthetic data)
    feature_extractor: str = "clip"  # FID features: clip | inception
    feature_weights: Optional[str] = None  # local pytorch-fid Inception weights (feature_extractor=inception)
    clip_model: str = "ViT-B-32"  # open_clip name for FID features and CLIP score; `tiny` = random (tests)
    clip_weights: Optional[str] = None  # local CLIP weights file (required unless clip_model=tiny)
    tokenizer: Optional[str] = None  # ImageTokenizer directory that decodes the image tokens (task vqd)
    reference_stats: Optional[str] = None  # real-image .npz (mu, sigma); default: decoded held-out tokens
    grid_size: int = 16  # samples shown in eval/<step>.png
    prior_steps: list[int] = field(default_factory=lambda: [8, 64])
    prior_run: Optional[str] = None  # task=decoder: a prior run dir; adds the text → prior → decoder chain (chain_*)
    poll_seconds: float = 30.0
    idle_timeout: float = 3600.0  # --watch gives up after this long without a new complete checkpoint
    lock_stale_seconds: float = 21600.0  # a claim older than this (a dead evaluator elsewhere) is retaken
    seed: int = 0


@dataclass
class LoggingConfig:
    """wandb (offline unless configured), JSONL metrics, console line."""
    every_steps: int = 10
    wandb_project: str = "vqd_scale"
    wandb_mode: str = "offline"  # offline | online | disabled; the WANDB_MODE environment variable wins
    wandb_entity: Optional[str] = None


@dataclass
class RunConfigBase:
    """The sections every run has; `families/__init__.py` adds each model family's own sections (`model`,
    `diffusion`, `prior`, …) to make `RunConfig`. Each component still gets only its own section."""
    task: str = "vqd"  # the model family: vqd_scale.families.FAMILIES
    run_dir: str = "runs/tiny"
    seed: int = 0
    max_samples: int = 100000
    text: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


def run_config_class(sections: dict[str, type]) -> type:
    """A RunConfig dataclass: the common sections plus `sections` (name → config dataclass), each defaulted."""
    common = {f.name for f in dataclasses.fields(RunConfigBase)}
    clash = sorted(common & set(sections))
    if clash:
        raise ValueError(f"family config sections {clash} collide with the common ones")
    return dataclasses.make_dataclass(
        "RunConfig", [(name, typ, field(default_factory=typ)) for name, typ in sections.items()],
        bases=(RunConfigBase,), namespace={"__doc__": RunConfigBase.__doc__})


def check(ok: bool, key: str, msg: str) -> None:
    """Raise ConfigError naming `key` unless `ok` (for the validators here and in each family)."""
    if not ok:
        raise ConfigError(f"config key '{key}': {msg}")


def validate_common(cfg: RunConfigBase) -> None:
    """Refuse values of the common sections that cannot work, naming the key (families check their own)."""
    _check = check
    _check(cfg.max_samples > 0, "max_samples", "must be > 0")
    for key, seed in (("seed", cfg.seed), ("data.seed", cfg.data.seed), ("eval.seed", cfg.eval.seed)):
        _check(seed >= 0, key, f"got {seed}; seeds must be >= 0")
    # every interval and count is checked here: a zero divides or loops forever only after launch
    _check(cfg.logging.every_steps >= 1, "logging.every_steps", "must be >= 1 (log every N optimizer steps)")
    _check(cfg.checkpoint.every_minutes > 0, "checkpoint.every_minutes",
           "must be > 0 (a large value turns time-based checkpoints off)")
    _check(cfg.checkpoint.milestone_every >= 0, "checkpoint.milestone_every", "must be >= 0 (0 = no milestones)")
    for key, v in (("text.tiny_width", cfg.text.tiny_width), ("text.tiny_layers", cfg.text.tiny_layers),
                   ("text.tiny_heads", cfg.text.tiny_heads), ("text.tiny_embed_dim", cfg.text.tiny_embed_dim)):
        _check(v is None or v >= 1, key, f"got {v}; must be >= 1 (or unset for the size's value)")
    _check(cfg.text.model == "tiny" or not (cfg.text.pretrained or "").startswith(("hf-hub:", "http")),
           "text.pretrained", "must be a local file or 'local-dir:PATH', never a hub tag or URL")
    _check(cfg.data.batch_size > 0, "data.batch_size", "must be > 0")
    _check(cfg.data.num_workers >= 0, "data.num_workers", "must be >= 0")
    _check(cfg.data.epoch_samples > 0, "data.epoch_samples", "must be > 0")
    _check(all(s.weight > 0 for s in cfg.data.sources), "data.sources[].weight", "weights must be > 0")
    _check(len(cfg.data.sources) > 0, "data.sources", "list at least one token-shard source")
    _check(len({s.name for s in cfg.data.sources}) == len(cfg.data.sources), "data.sources[].name",
           "source names must be distinct")
    _check(cfg.data.shuffle_buffer >= 0, "data.shuffle_buffer", "must be >= 0 (0 keeps shard order)")
    _check(cfg.data.timeout_s > 0, "data.timeout_s", "must be > 0 seconds")
    _check(cfg.data.max_consecutive_failures >= 1, "data.max_consecutive_failures", "must be >= 1")
    _check(cfg.deepspeed.zero_stage in (0, 1, 2, 3), "deepspeed.zero_stage",
           f"got {cfg.deepspeed.zero_stage}; use 0, 1, 2 or 3")
    _check(cfg.deepspeed.precision in ("auto", "fp32", "bf16", "fp16"), "deepspeed.precision",
           f"got {cfg.deepspeed.precision!r}; use auto, fp32, bf16 or fp16")
    _check(cfg.deepspeed.communication_dtype in ("fp32", "model"), "deepspeed.communication_dtype",
           f"got {cfg.deepspeed.communication_dtype!r}; use fp32 or model")
    _check(cfg.deepspeed.grad_accum >= 1, "deepspeed.grad_accum", "must be >= 1")
    _check(cfg.deepspeed.bucket_elements >= 1_000_000, "deepspeed.bucket_elements",
           "must be >= 1e6 (smaller buckets make ZeRO communication latency-bound)")
    o = cfg.optim
    _check(o.lr > 0, "optim.lr", f"got {o.lr}; must be > 0")
    _check(o.eps > 0, "optim.eps", "must be > 0")
    _check(o.warmup_samples >= 0, "optim.warmup_samples", "must be >= 0")
    _check(0.0 <= o.min_lr_ratio <= 1.0, "optim.min_lr_ratio", "must be in [0, 1]")
    _check(all(0.0 <= b < 1.0 for b in o.betas), "optim.betas", "each beta must be in [0, 1)")
    _check(o.weight_decay >= 0, "optim.weight_decay", "must be >= 0")
    _check(o.grad_clip >= 0, "optim.grad_clip", "must be >= 0 (0 disables clipping)")
    _check(o.decay in ("cosine", "constant", "linear"), "optim.decay", "use cosine, constant or linear")
    _check(0.0 <= o.ema_decay < 1.0, "optim.ema_decay", "must be in [0, 1)")
    _check(o.ema_every >= 1, "optim.ema_every", "must be >= 1")
    _check(cfg.checkpoint.keep_last >= 1, "checkpoint.keep_last", "must be >= 1")
    _check(cfg.checkpoint.every_steps >= 1, "checkpoint.every_steps", "must be >= 1")
    _check(cfg.logging.wandb_mode in ("offline", "online", "disabled"), "logging.wandb_mode",
           "use offline, online or disabled")
    e, sc = cfg.eval, cfg.eval.sampler
    _check(sc.steps >= 1, "eval.sampler.steps", "must be >= 1")
    _check(0.0 < sc.truncation_rate <= 1.0, "eval.sampler.truncation_rate", "must be in (0, 1]")
    _check(sc.guidance_scale >= 0, "eval.sampler.guidance_scale", "must be >= 0")
    _check(sc.purity_temperature >= 0, "eval.sampler.purity_temperature", "must be >= 0")
    _check(sc.batch_size >= 1, "eval.sampler.batch_size", "must be >= 1")
    _check(e.num_samples >= 2, "eval.num_samples", "must be >= 2 (FID needs a covariance)")
    _check(set(e.metrics) <= {"fid", "clip_score", "attributes"}, "eval.metrics",
           f"got {e.metrics}; choose from fid, clip_score, attributes")
    _check(e.feature_extractor in ("clip", "inception"), "eval.feature_extractor", "use clip or inception")
    _check(e.grid_size >= 1, "eval.grid_size", "must be >= 1")
    _check(len(e.prior_steps) > 0 and all(k >= 1 for k in e.prior_steps), "eval.prior_steps",
           "give at least one step count, each >= 1")
    _check(e.poll_seconds > 0 and e.idle_timeout >= 0, "eval.poll_seconds", "poll_seconds > 0, idle_timeout >= 0")
    _check(e.lock_stale_seconds > 0, "eval.lock_stale_seconds", "must be > 0")


def parse_config(cls: type, path: Optional[str | Path] = None, overrides: Optional[list[str]] = None):
    """YAML file (optional) + dotted overrides (`optim.lr=1e-4`) → an instance of the dataclass `cls`, unvalidated.

    Parsing and type checks are OmegaConf's (an unknown key or a wrong type is named); a missing file or a
    YAML syntax error is one ConfigError too. `vqd_scale.families.load_config` adds the value checks.
    """
    import yaml

    if path is not None and not Path(path).is_file():
        raise ConfigError(f"config file {path} does not exist")
    layers = [OmegaConf.structured(cls)]
    try:
        if path is not None:
            layers.append(OmegaConf.load(str(path)))
        if overrides:
            layers.append(OmegaConf.from_dotlist(list(overrides)))
        return OmegaConf.to_object(OmegaConf.merge(*layers))
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: YAML syntax error: {yaml_error_line(e)}") from None
    except OmegaConfBaseException as e:  # unknown key, wrong type: OmegaConf names the key
        raise ConfigError(f"bad config ({path or 'defaults'}): {e}") from None


def yaml_error_line(e: Exception) -> str:
    """PyYAML's multi-line message as one line with the line/column of the problem."""
    mark = getattr(e, "problem_mark", None)
    what = getattr(e, "problem", None) or " ".join(str(e).split())
    return f"{what} (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else what


def to_dict(cfg: Any) -> dict:
    """Plain dict (for JSON/YAML dumps and checkpoints)."""
    return dataclasses.asdict(cfg)


def save_config(cfg: Any, path: str | Path) -> None:
    """Write the fully resolved config as YAML."""
    Path(path).write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
