"""The decoder's part of the eval job: images from the held-out ground-truth CLIP image embeddings, and, when
eval.prior_run names a prior run, the whole chain from the held-out captions (text → prior → decoder)."""
from __future__ import annotations

import copy
import dataclasses
from typing import Optional

import torch
import torch.nn.functional as F

from vqd_scale.errors import UserError
from vqd_scale.eval.heldout import HeldOut
from vqd_scale.eval.ranks import Ranks
from vqd_scale.families.base import TEXT_TO_EMBEDDING, Grid
from vqd_scale.families.prior.evaluate import check_heldout_embeddings
from vqd_scale.families.vqd.evaluate import ImageMetrics, heldout_grid, load_image_tokenizer, sample_generator

CHAIN = "chain_"  # prefix of the chain's metrics (the others are the decoder's from true embeddings)


def load_chain_prior(cfg, device):
    """(prior cfg, Sampler) of eval.prior_run's newest complete checkpoint, checked against the decoder."""
    from vqd_scale.families import load_sampler

    pcfg, prior = load_sampler(cfg.eval.prior_run, device)
    if TEXT_TO_EMBEDDING not in prior.modes:
        raise UserError(f"eval.prior_run={cfg.eval.prior_run} is a task={pcfg.task!r} run, which does not turn "
                        "captions into CLIP image embeddings; name a task=prior run")
    if prior.embed_dim != cfg.decoder.embed_dim:
        raise UserError(f"eval.prior_run emits {prior.embed_dim}-d embeddings but decoder.embed_dim="
                        f"{cfg.decoder.embed_dim}; pair runs trained on the same CLIP embeddings")
    return pcfg, prior


class DecoderEvaluator:
    """One image per held-out record from its true embedding (decoder alone) and from its caption (chain)."""

    def __init__(self, cfg, run_dir, ranks: Ranks, heldout: HeldOut):
        from vqd_scale.families.decoder.task import DecoderTask

        self.cfg, self.r, self.heldout = cfg, ranks, heldout
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)  # as vqd-train builds it: a random-init text tower comes out the same
            # the checkpoint carries the embedding stats: the file may be gone or refit since training
            self.task = DecoderTask(cfg.model, cfg.diffusion, dataclasses.replace(cfg.decoder, embed_stats=None),
                                    cfg.text, ranks.device)
        self.module, self.model_config, self.text = self.task.module, self.task.model_config, self.task.text
        self.autocast = torch.bfloat16 if ranks.device.type == "cuda" else None
        check_heldout_embeddings(cfg, heldout, cfg.decoder.embed_dim, "decoder.embed_dim")
        self.tokenizer = load_image_tokenizer(cfg, heldout, ranks.device)
        ranks.require_a_chunk_each(len(heldout), cfg.eval.sampler.batch_size)
        self.images = ImageMetrics(cfg, run_dir, ranks, heldout, self.tokenizer)
        self.notes = dict(self.images.notes)
        self.prior = self.chain = None
        if cfg.eval.prior_run:
            if heldout.text_emb is None:
                raise UserError("the chain evaluation needs the held-out captions' CLIP text embeddings "
                                "(txt.emb.npy): extract eval.shards with --clip-model")
            self.prior_cfg, self.prior = load_chain_prior(cfg, ranks.device)
            self.chain = copy.copy(self.images)  # shares the feature extractors and the reference statistics
            self.chain.reset()
            self.notes.update({CHAIN + k: why for k, why in self.images.notes.items()})

    def _tokens(self, emb: torch.Tensor, chunk: list[int], generator) -> torch.Tensor:
        """Decoder samples for embeddings [b,E] (+ the held-out captions when it reads text), as images."""
        from vqd_scale.generate import generate_from_embeddings

        e, mc, h = self.cfg.eval, self.cfg.model, self.heldout
        tokens = generate_from_embeddings(self.module, self.task.diffusion, emb, e.sampler, generator, self.text,
                                          h.text_tokens[chunk] if self.cfg.decoder.with_text else None,
                                          self.cfg.decoder.guidance_drops, self.autocast)
        return self.tokenizer.decode(tokens.view(len(chunk), mc.height, mc.width))  # [b,3,H,W]

    def evaluate(self) -> tuple[dict, Optional[Grid]]:
        e, h = self.cfg.eval, self.heldout
        bs, grid, cos = e.sampler.batch_size, [], []
        for k, chunk in self.r.chunks(len(h), bs):
            captions = [h.captions[i] for i in chunk]
            images = self._tokens(h.image_emb[chunk], chunk, sample_generator(self.r.device, e.seed, k))
            self.images.add(images, captions)
            if self.r.is_main and sum(len(c) for _, c in grid) < e.grid_size:
                grid.append((images.cpu(), chunk))
            if self.prior is not None:
                # the same decoder noise as above: chain − alone measures what the prior's embeddings cost
                gen = sample_generator(self.r.device, e.seed, k)
                emb = self.prior.embeddings_from_text(h.text_tokens[chunk], h.text_emb[chunk],
                                                      torch.Generator(self.r.device).manual_seed(e.seed * 7 + k))
                cos.append(F.cosine_similarity(emb.float().cpu(), h.image_emb[chunk].float(), dim=-1).double())
                self.chain.add(self._tokens(emb, chunk, gen), captions)
        metrics = self.images.summary(bs)
        if self.prior is not None:
            metrics.update({CHAIN + k: v for k, v in self.chain.summary(bs).items()})
            metrics[CHAIN + "prior_cos_image"] = float(self.r.gather_rows(torch.cat(cos), len(h), bs).mean())
        return metrics, heldout_grid(grid, h, self.tokenizer, e.grid_size)

    def sampler_settings(self) -> dict:
        out = {**dataclasses.asdict(self.cfg.eval.sampler), "guidance_drops": self.cfg.decoder.guidance_drops,
               "condition": "held-out CLIP image embeddings"}
        if self.prior is not None:
            s = self.prior_cfg.shifted
            out["chain_prior"] = {"run": self.cfg.eval.prior_run, "steps": s.sample_steps, "shifted": s.shifted,
                                  "guidance_scale": s.guidance_scale, "kappa": s.kappa}
        return out
