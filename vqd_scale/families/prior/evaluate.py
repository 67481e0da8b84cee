"""The prior's part of the eval job: DALLE2-style cosines of generated embeddings at eval.prior_steps."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional

import torch

from vqd_scale.data.schema import MANIFEST, read_manifest
from vqd_scale.errors import UserError
from vqd_scale.eval.heldout import HeldOut, expand
from vqd_scale.eval.ranks import Ranks
from vqd_scale.families.base import Grid
from vqd_scale.families.prior.metrics import prior_metrics

PRIOR_BATCH = 256  # embeddings per prior sampling call: tiny tensors, so one call per few hundred


def check_heldout_embeddings(cfg, h: HeldOut, dim: int, dim_key: str) -> None:
    """Held-out embeddings must exist and come from the CLIP model trained on (width, manifest name)."""
    e = cfg.eval
    if h.image_emb is None:
        raise UserError(f"task={cfg.task} eval needs CLIP image embeddings in eval.shards ({e.shards}); "
                        "extract them with --clip-model (img.emb.npy)")
    for name, emb in (("image", h.image_emb), ("text", h.text_emb)):
        if emb is not None and emb.shape[1] != dim:
            raise UserError(f"eval.shards hold {emb.shape[1]}-d {name} embeddings but {dim_key}={dim}; use "
                            "held-out shards extracted with the training data's --clip-model")
    manifests = [cfg.data.manifest, str(Path(expand(e.shards)[0]).parent / MANIFEST)]
    models = [(read_manifest(m).get("embedding_model") or {}).get("model") if m and Path(m).exists() else None
              for m in manifests]
    if None not in models and models[0] != models[1]:
        raise UserError(f"the model was trained on {models[0]} embeddings (data.manifest) but eval.shards "
                        f"were extracted with --clip-model {models[1]}; use held-out shards of the same model")


class PriorEvaluator:
    """Cosine(generated, true image / text embedding) and controls per global chunk, averaged over all pairs."""

    def __init__(self, cfg, run_dir, ranks: Ranks, heldout: HeldOut):
        from vqd_scale.families.prior.task import PriorTask

        self.cfg, self.r, self.heldout = cfg, ranks, heldout
        # The checkpoint carries the mixture (frozen parameters the job loads): the clusters file may be gone
        # or refit since training, so it is not read; sampling uses cfg.shifted as trained.
        build = dataclasses.replace(cfg.shifted, clusters=None, shifted=False)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)  # as vqd-train builds it: a random-init text tower comes out the same
            self.task = PriorTask(cfg.prior, build, cfg.text, ranks.device)
        self.module, self.model_config, self.text = self.task.module, self.task.model_config, self.task.text
        self.autocast, self.notes = None, {}
        check_heldout_embeddings(cfg, heldout, cfg.prior.embed_dim, "prior.embed_dim")

    def evaluate(self) -> tuple[dict, Optional[Grid]]:
        e, h = self.cfg.eval, self.heldout
        parts = []
        for k, chunk in self.r.chunks(len(h), PRIOR_BATCH):
            context, text_emb = self.task.text_inputs(
                {"text_tokens": h.text_tokens[chunk], "text_emb": None if h.text_emb is None else h.text_emb[chunk]})
            parts.append((len(chunk), prior_metrics(self.task.module, self.cfg.shifted, h.image_emb[chunk], text_emb,
                                                    context, steps=e.prior_steps, seed=e.seed * 1_000_003 + k)))
        parts = [p for rank_parts in self.r.gather_objects(parts) for p in rank_parts]
        total = sum(w for w, _ in parts)  # chunk means weighted by chunk size = mean over all pairs
        return {name: sum(w * m[name] for w, m in parts) / total for name in parts[0][1]}, None

    def sampler_settings(self) -> dict:
        s = self.cfg.shifted
        return {"steps": list(self.cfg.eval.prior_steps), "guidance_scale": s.guidance_scale, "kappa": s.kappa,
                "sample_variance": s.sample_variance, "clamp_x0": s.clamp_x0, "shifted": s.shifted}
