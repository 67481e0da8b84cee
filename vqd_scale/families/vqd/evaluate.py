"""VQ-Diffusion's part of the eval job: sample the held-out captions, decode, FID / CLIP score / attributes."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Optional

import torch

from vqd_scale.data.schema import read_manifest
from vqd_scale.errors import UserError
from vqd_scale.eval import metrics as M
from vqd_scale.eval.heldout import HeldOut
from vqd_scale.eval.ranks import Ranks
from vqd_scale.families.base import Grid
from vqd_scale.rundir import EVAL_DIR

def sample_generator(device: torch.device, seed: int, chunk_id: int) -> torch.Generator:
    """The same noise for every checkpoint and any number of ranks: metric changes come from the weights."""
    return torch.Generator(device).manual_seed(seed * 1_000_003 + chunk_id)


def load_image_tokenizer(cfg, heldout: HeldOut, device: torch.device):
    """eval.tokenizer, checked against the held-out shards, the training data and the model's K."""
    from vqd_scale.models.vqvae import ImageTokenizer

    e, mc = cfg.eval, cfg.model
    if not e.tokenizer:
        raise UserError("eval.tokenizer is not set: give the ImageTokenizer directory the shards were "
                        "extracted with (it decodes the sampled tokens into images)")
    tokenizer = ImageTokenizer.load(e.tokenizer, device)
    tid = tokenizer.tokenizer_id
    if heldout.tokenizer_id and heldout.tokenizer_id != tid:
        raise UserError(f"eval.shards were extracted with tokenizer {heldout.tokenizer_id} but "
                        f"eval.tokenizer={e.tokenizer} is {tid}; use the matching pair")
    if cfg.data.manifest and Path(cfg.data.manifest).exists():
        trained = read_manifest(cfg.data.manifest).get("tokenizer_id")
        if trained and trained != tid:
            raise UserError(f"the model was trained on tokens of {trained} (data.manifest) but "
                            f"eval.tokenizer={e.tokenizer} is {tid}; decode with the training tokenizer")
    if tokenizer.num_classes != mc.num_classes:
        raise UserError(f"eval.tokenizer has {tokenizer.num_classes} codes but model.num_classes="
                        f"{mc.num_classes}; use the tokenizer the model was trained with")
    if tuple(heldout.image_tokens.shape[1:]) != (mc.height, mc.width):
        raise UserError(f"held-out image tokens are {tuple(heldout.image_tokens.shape[1:])} but the "
                        f"model samples {mc.height}×{mc.width}")
    return tokenizer


class ImageMetrics:
    """FID (CLIP or Inception features), CLIP score and attribute accuracy of sampled images; shared by the
    families that end in images. Feature extractors and the real-image statistics are built once."""

    def __init__(self, cfg, run_dir: Path, ranks: Ranks, heldout: HeldOut, tokenizer):
        e = cfg.eval
        self.cfg, self.run_dir, self.r, self.heldout, self.tokenizer = cfg, Path(run_dir), ranks, heldout, tokenizer
        self.clip = self.features = None
        self._ref: Optional[tuple] = None
        self.notes = M.metric_notes(e.metrics, heldout.captions, e.feature_extractor, e.clip_model, e.clip_weights)
        for name, why in self.notes.items() if ranks.is_main else ():
            print(f"vqd-eval: {name} is {why} (kept out of the metrics)", flush=True)
        if "clip_score" in e.metrics or ("fid" in e.metrics and e.feature_extractor == "clip"):
            self.clip = M.ClipFeatures(e.clip_model, e.clip_weights).to(ranks.device)
        if "fid" in e.metrics:
            self.features = (self.clip if e.feature_extractor == "clip" else
                             M.FEATURE_EXTRACTORS[e.feature_extractor](e.clip_model, e.clip_weights,
                                                                       e.feature_weights).to(ranks.device))
        self.reset()

    def reset(self) -> None:
        self.feats, self.clip_rows, self.attr_rows = [], [], []

    def add(self, images: torch.Tensor, captions: list[str]) -> None:
        """Per-chunk rows of this rank's samples [b,3,H,W] and their captions."""
        e = self.cfg.eval
        img_emb = self.clip(images) if self.clip is not None else None
        if self.features is not None:
            self.feats.append((img_emb if self.features is self.clip else self.features(images)).double().cpu())
        if "clip_score" in e.metrics:
            self.clip_rows.append(M.clip_score(img_emb, self.clip.text(captions)).double().cpu())
        if "attributes" in e.metrics and "attributes" not in self.notes:
            self.attr_rows.append(M.attribute_hits(captions, images.cpu()))

    def summary(self, bs: int) -> dict[str, float]:
        """Every metric over all ranks' rows (collective); FID on rank 0."""
        n, out = len(self.heldout), {}
        if self.features is not None:
            fake = self.r.gather_rows(torch.cat(self.feats), n, bs)
            mu_r, sigma_r = self.reference(bs)
            if self.r.is_main:
                out["fid"] = M.frechet_distance(*M.gaussian_stats(fake), mu_r, sigma_r)
        if self.clip_rows:
            out["clip_score"] = float(self.r.gather_rows(torch.cat(self.clip_rows), n, bs).mean())
        if self.attr_rows:
            out.update(M.attribute_summary(self.r.gather_rows(torch.cat(self.attr_rows), n, bs)))
        self.reset()
        return out

    def reference(self, bs: int) -> tuple:
        """Real-image statistics: eval.reference_stats, else the decoded held-out tokens' — computed once and
        cached as eval/reference_<hash>.npz (keyed by the records and their tokens, extractor, tokenizer)."""
        if self._ref is None:
            e, h = self.cfg.eval, self.heldout
            if e.reference_stats:
                self._ref = M.load_stats(e.reference_stats)
                return self._ref
            # the tokens' content, not only their keys: another held-out set can reuse keys (img2dataset's
            # 000000000, … restart per download) and would silently get this set's statistics
            content = hashlib.sha1(h.image_tokens.numpy().tobytes()).hexdigest()
            key = json.dumps([h.keys, content, e.feature_extractor, e.clip_model, e.clip_weights, e.feature_weights,
                              self.tokenizer.tokenizer_id])
            cache = self.run_dir / EVAL_DIR / f"reference_{hashlib.sha1(key.encode()).hexdigest()[:12]}.npz"
            if self.r.decide(cache.exists):  # every rank must agree: computing it is collective
                self._ref = M.load_stats(cache)
                return self._ref
            rows = [self.features(self.tokenizer.decode(h.image_tokens[c].to(self.r.device))).double().cpu()
                    for _, c in self.r.chunks(len(h), bs)]
            self._ref = M.gaussian_stats(self.r.gather_rows(torch.cat(rows), len(h), bs))
            if self.r.is_main:
                tmp = cache.with_name(f".{cache.stem}.tmp{os.getpid()}.npz")
                M.save_stats(tmp, *self._ref)
                os.replace(tmp, cache)
        return self._ref


class VQDEvaluator:
    """Samples one image per held-out caption with eval.sampler; the job loads each checkpoint into `module`."""

    def __init__(self, cfg, run_dir, ranks: Ranks, heldout: HeldOut):
        from vqd_scale.families.vqd.task import VQDTask

        self.cfg, self.r, self.heldout = cfg, ranks, heldout
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)  # as vqd-train builds it: a random-init text tower comes out the same
            self.task = VQDTask(cfg.model, cfg.diffusion, cfg.text, ranks.device)
        self.module, self.model_config, self.text = self.task.module, self.task.model_config, self.task.text
        # bf16 autocast for the transformer on GPU (as training's precision=auto); exact fp32 on CPU
        self.autocast = torch.bfloat16 if ranks.device.type == "cuda" else None
        self.tokenizer = load_image_tokenizer(cfg, heldout, ranks.device)
        ranks.require_a_chunk_each(len(heldout), cfg.eval.sampler.batch_size)
        self.images = ImageMetrics(cfg, run_dir, ranks, heldout, self.tokenizer)
        self.notes = self.images.notes

    def evaluate(self) -> tuple[dict, Optional[Grid]]:
        from vqd_scale.generate import generate

        e, h, mc = self.cfg.eval, self.heldout, self.cfg.model
        bs, grid = e.sampler.batch_size, []
        for k, chunk in self.r.chunks(len(h), bs):
            tokens = generate(self.task.module, self.text, self.task.diffusion, h.text_tokens[chunk], e.sampler,
                              sample_generator(self.r.device, e.seed, k), autocast_dtype=self.autocast)  # Long[b, N]
            images = self.tokenizer.decode(tokens.view(len(chunk), mc.height, mc.width))  # [b,3,H,W]
            self.images.add(images, [h.captions[i] for i in chunk])
            if self.r.is_main and sum(len(c) for _, c in grid) < e.grid_size:
                grid.append((images.cpu(), chunk))
        return self.images.summary(bs), heldout_grid(grid, h, self.tokenizer, e.grid_size)

    def sampler_settings(self) -> dict:
        return dataclasses.asdict(self.cfg.eval.sampler)


def heldout_grid(parts: list[tuple[torch.Tensor, list[int]]], h: HeldOut, tokenizer, size: int) -> Optional[Grid]:
    """The first `size` samples with their captions and the held-out image (its tokens decoded) beside each."""
    if not parts:
        return None
    images = torch.cat([im for im, _ in parts])[:size]
    idx = [i for _, c in parts for i in c][:size]
    refs = tokenizer.decode(h.image_tokens[idx].to(tokenizer.codebook().device)).float().cpu()
    return Grid(images, [h.captions[i] for i in idx], refs)
