"""What every model family gives the shared training loop, eval job and CLIs (torchtitan's `ModelSpec`).

A family is one package under `families/` exporting a `Family`; `families/__init__.py` lists them. The
loop, the eval job and the CLIs dispatch only through these fields, so a new family never touches them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Protocol

import torch
from torch import nn

from vqd_scale.errors import UserError

CAPTIONS = ("required", "optional")


@dataclass(frozen=True)
class DataNeeds:
    """What a family reads from token shards: the loader and the manifests are checked against it."""
    embeddings: bool = False  # img.emb.npy / txt.emb.npy: shards extracted with --clip-model
    captions: str = "required"  # "optional": image-only records train too (the text is then the null one)

    def __post_init__(self):
        if self.captions not in CAPTIONS:
            raise ValueError(f"DataNeeds.captions={self.captions!r}; use one of {CAPTIONS}")


@dataclass(frozen=True)
class Flops:
    """Training FLOPs per sample: what the model needs (MFU) and what runs with recompute (HFU)."""
    model: float = 0.0
    hardware: float = 0.0


class Task(Protocol):
    """One training step of a family (open_clip's `TrainingTask.training_forward`)."""
    module: nn.Module  # trainable, handed to DeepSpeed; its state dict is what checkpoints hold
    model_config: dict  # compared on resume and eval: another model size is refused
    gather_keys: tuple[str, ...]  # per-sample metrics all-gathered for `after_step`
    tokens_per_sample: int
    flops: Flops

    def loss(self, module, batch: dict, generator: torch.Generator) -> tuple[torch.Tensor, dict]: ...
    def after_step(self, gathered: dict) -> None: ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...


@dataclass
class Grid:
    """Samples for a results PNG: images F[B,3,H,W] in [-1,1], each with its caption and a reference image."""
    images: torch.Tensor
    captions: Optional[list[str]] = None
    references: Optional[torch.Tensor] = None


class Evaluator(Protocol):
    """A family's part of the eval job: the job loads each checkpoint's weights into `module`, then calls it."""
    module: nn.Module
    model_config: dict
    text: Optional[nn.Module]  # the frozen text tower (the run's saved random-init one is loaded into it)
    notes: dict[str, str]  # requested metrics that would mean nothing here → why (reported apart)
    autocast: Optional[torch.dtype]

    def evaluate(self) -> tuple[dict[str, float], Optional[Grid]]: ...
    def sampler_settings(self) -> dict: ...


# What a family's trained module turns into what (vqd-sample chains them: text → prior → decoder → image)
TEXT_TO_TOKENS, EMBEDDING_TO_TOKENS, TEXT_TO_EMBEDDING = "text→tokens", "embedding→tokens", "text→embedding"


class Sampler(Protocol):
    """A family's trained module ready to generate (vqd-sample, the decoder's chain evaluation)."""
    modes: frozenset[str]  # which of the three conversions above it does
    text: Optional[nn.Module]  # its frozen text tower (tokenize), None when it reads no text

    def tokens_from_text(self, text_tokens: torch.Tensor, sampler_cfg, generator) -> torch.Tensor: ...
    def tokens_from_embeddings(self, image_emb: torch.Tensor, text_tokens: Optional[torch.Tensor], sampler_cfg,
                               generator) -> torch.Tensor: ...
    def embeddings_from_text(self, text_tokens: torch.Tensor, text_emb: torch.Tensor, generator) -> torch.Tensor: ...


@dataclass(frozen=True)
class Family:
    """The typed interface of one model family; see docs/architecture.md ("Model families")."""
    name: str
    summary: str  # one line: what it generates from what
    sections: Mapping[str, type]  # the RunConfig sections it owns, name → config dataclass
    needs: DataNeeds
    validate: Callable[[Any, bool], None]  # (cfg, active): ConfigError naming the key; active = cfg.task is it
    resolve: Callable[[Any], Any]  # cfg → cfg with data-dependent settings from the token manifests
    dropout: Callable[[Any], Mapping[str, float]]  # per-condition dropout the loader draws: {"text": p, ...}
    build_task: Callable[[Any, torch.device], Task]
    evaluator: Callable[..., Evaluator]  # (cfg, run_dir, ranks, heldout) → Evaluator
    export: Optional[Callable[..., Any]] = None  # vqd-export to-diffusers; None: refused by name
    init_hint: Optional[Callable[[Any, Any], str]] = None  # (cfg, sidecar .yaml) → the settings to change
    # (cfg, weights, device, load_text: () → the run's text tower) → Sampler; None: vqd-sample refuses it by name
    sampler: Optional[Callable[..., Sampler]] = None
    notes: Mapping[str, str] = field(default_factory=dict)  # extra lines printed by `vqd-train --families`
    # cfg → (cross-attention context length, whether the frozen text tower runs), for the capacity planner
    # (train/plan.py); None: model.context_len text tokens from the text tower, as task vqd
    plan_context: Optional[Callable[[Any], tuple[int, bool]]] = None


def batch_image_emb(batch: dict, device: torch.device, dim: int, who: str, dim_key: str, fix: str) -> torch.Tensor:
    """The batch's CLIP image embeddings F[B, dim] in fp32 on `device`; a missing or mis-sized one is refused."""
    if batch.get("image_emb") is None:
        raise UserError(f"the {who} trains on CLIP image embeddings but the batch has no image_emb; {fix}")
    emb = batch["image_emb"].to(device, non_blocking=True).float()
    if emb.shape[1] != dim:
        raise UserError(f"image embeddings are {emb.shape[1]}-d but {dim_key}={dim}")
    return emb
