"""The separately scheduled eval job: load a complete checkpoint's EMA weights, sample held-out
captions (rank-parallel when launched with several ranks), compute the metrics on rank 0, and write
`eval/<step>.json`, `eval/<step>.png`, `eval/curves.png` and a wandb entry keyed by the train step.

Which checkpoint to evaluate (once each, claims, --watch) is `eval/watch.py`'s; this module is what
one evaluation does. Everything loaded once (held-out data, text tower, tokenizer, feature
extractors, reference statistics) is kept across checkpoints of one process.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from vqd_scale.config import RunConfig
from vqd_scale.data.schema import MANIFEST, read_manifest, write_json_atomic
from vqd_scale.eval import metrics as M
from vqd_scale.eval import plots
from vqd_scale.eval.heldout import HeldOut, read_heldout
from vqd_scale.eval.watch import EVAL_DIR, result_path, wandb_run
from vqd_scale.train import distributed as D
from vqd_scale.train.checkpoint import EMA_FILE, TEXT_FILE, check_same_model, load_weights, read_complete

log = logging.getLogger(__name__)
PRIOR_BATCH = 256  # embeddings per prior sampling call: tiny tensors, so one call per few hundred


@dataclasses.dataclass
class Ranks:
    """This process's place in the eval job; every collective goes through here (optional: world 1)."""
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def chunks(self, n: int, size: int) -> list[tuple[int, list[int]]]:
        """(global chunk id, sample indices) of the chunks this rank processes: chunk k → rank k mod world.

        Sampling noise is seeded per global chunk, so results do not depend on the number of ranks.
        """
        return [(k, c) for k, c in enumerate(_chunks(list(range(n)), size)) if k % self.world == self.rank]

    def gather_rows(self, x: torch.Tensor, n: int, size: int) -> torch.Tensor:
        """Rows of this rank's `chunks(n, size)` from every rank → all n rows in global order, on every rank."""
        if self.world == 1:
            return x
        owned = [[i for k, c in enumerate(_chunks(list(range(n)), size)) if k % self.world == r for i in c]
                 for r in range(self.world)]
        per = max(map(len, owned))
        pad = x.new_zeros((per - x.shape[0], *x.shape[1:]))
        g = D.all_gather_cat(torch.cat([x, pad]).to(self.device)).cpu()  # [world·per, ...], rank order
        g = g.view(self.world, per, *x.shape[1:])  # [world, per, ...]
        out = x.new_empty((n, *x.shape[1:]))
        for r, idx in enumerate(owned):
            out[idx] = g[r, :len(idx)]
        return out

    def gather_objects(self, obj: Any) -> list:
        """Every rank's picklable `obj`, in rank order, on every rank."""
        if self.world == 1:
            return [obj]
        import torch.distributed as dist
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def decide(self, f: Callable[[], Any]) -> Any:
        """Run `f` on rank 0 and hand its (picklable) result to every rank."""
        if self.world == 1:
            return f()
        import torch.distributed as dist
        box = [f() if self.is_main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]


def setup_ranks() -> Ranks:
    """Rank / world / device from SLURM or torchrun; a process group only when there are several ranks."""
    env = D.detect_env()
    device = D.device_for(env)
    if env.world_size > 1:
        import torch.distributed as dist
        # Plain torch.distributed (no DeepSpeed import: seconds per rank, and eval needs no engine);
        # env:// reads what detect_env derived, e.g. from SLURM.
        os.environ.update(RANK=str(env.rank), LOCAL_RANK=str(env.local_rank), WORLD_SIZE=str(env.world_size),
                          MASTER_ADDR=env.master_addr, MASTER_PORT=str(env.master_port))
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=env.rank,
                                world_size=env.world_size)
    return Ranks(env.rank, env.world_size, device)


def _chunks(idx: list[int], size: int) -> list[list[int]]:
    """Consecutive chunks of `size`; a last chunk of one joins the previous (batch statistics need two)."""
    out = [idx[i:i + size] for i in range(0, len(idx), size)]
    if len(out) > 1 and len(out[-1]) == 1:
        last = out.pop()  # (not `out[-2] += out.pop()`: the index would be taken before the pop)
        out[-1] = out[-1] + last
    return out


class Evaluator:
    """Callable `(step, ckpt_dir) -> result dict` for `watch.run`; results are written on rank 0."""

    def __init__(self, cfg: RunConfig, run_dir: str | os.PathLike, ranks: Optional[Ranks] = None):
        from vqd_scale.tasks import build_task

        self.cfg, self.run_dir, self.r = cfg, Path(run_dir), ranks or Ranks()
        e = cfg.eval
        self.heldout: HeldOut = read_heldout(e.shards, e.num_samples)
        build_cfg = cfg
        if cfg.task == "prior":
            # The checkpoint carries the mixture (frozen parameters, required by _load): the clusters file
            # may be gone or refit since training, so it is not read; sampling uses cfg.shifted as trained.
            build_cfg = dataclasses.replace(cfg, shifted=dataclasses.replace(cfg.shifted, clusters=None, shifted=False))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)  # as vqd-train builds it: a random-init text tower comes out the same
            self.task = build_task(build_cfg, self.r.device)
        self._load_text_tower()
        self.task.module.to(self.r.device).eval().requires_grad_(False)
        self.tokenizer = self.clip = self.features = None
        self.notes: dict[str, str] = {}  # requested metrics that would mean nothing here → why (not reported)
        self._ref: Optional[tuple] = None
        self._wandb = None
        # bf16 autocast for the transformer on GPU (as training's precision=auto); exact fp32 on CPU
        self.autocast = torch.bfloat16 if self.r.device.type == "cuda" else None
        if cfg.task == "vqd":
            self._setup_vqd()
        elif self.heldout.image_emb is None:
            raise ValueError(f"task=prior eval needs CLIP image embeddings in eval.shards ({e.shards}); "
                             "extract them with --clip-model (img.emb.npy)")
        else:
            self._check_prior_heldout()
        (self.run_dir / EVAL_DIR).mkdir(parents=True, exist_ok=True)

    def _load_text_tower(self) -> None:
        """Without text.pretrained, training saved its random-init frozen tower in the run dir: use it."""
        text = getattr(self.task, "text", None)
        path = self.run_dir / TEXT_FILE
        if text is None or self.cfg.text.pretrained:
            return
        if path.is_file():
            from safetensors.torch import load_file
            text.load_state_dict(load_file(str(path), device=str(self.r.device)))
        else:
            log.warning("text.pretrained is unset and %s is missing: using a text tower re-initialised from "
                        "seed %d, which matches training only if it was built the same way", path, self.cfg.seed)

    def _check_prior_heldout(self) -> None:
        """Held-out embeddings must come from the CLIP model the prior was trained on (width, manifest name)."""
        e, h, dim = self.cfg.eval, self.heldout, self.cfg.prior.embed_dim
        for name, emb in (("image", h.image_emb), ("text", h.text_emb)):
            if emb is not None and emb.shape[1] != dim:
                raise ValueError(f"eval.shards hold {emb.shape[1]}-d {name} embeddings but prior.embed_dim={dim}; "
                                 "use held-out shards extracted with the training data's --clip-model")
        from vqd_scale.eval.heldout import expand
        manifests = [self.cfg.data.manifest, str(Path(expand(e.shards)[0]).parent / MANIFEST)]
        models = [(read_manifest(m).get("embedding_model") or {}).get("model") if m and Path(m).exists() else None
                  for m in manifests]
        if None not in models and models[0] != models[1]:
            raise ValueError(f"the prior was trained on {models[0]} embeddings (data.manifest) but eval.shards "
                             f"were extracted with --clip-model {models[1]}; use held-out shards of the same model")

    def _setup_vqd(self) -> None:
        from vqd_scale.models.vqvae import ImageTokenizer

        e, mc = self.cfg.eval, self.cfg.model
        if not e.tokenizer:
            raise ValueError("eval.tokenizer is not set: give the ImageTokenizer directory the shards were "
                             "extracted with (it decodes the sampled tokens into images)")
        self.tokenizer = ImageTokenizer.load(e.tokenizer, self.r.device)
        tid = self.tokenizer.tokenizer_id
        if self.heldout.tokenizer_id and self.heldout.tokenizer_id != tid:
            raise ValueError(f"eval.shards were extracted with tokenizer {self.heldout.tokenizer_id} but "
                             f"eval.tokenizer={e.tokenizer} is {tid}; use the matching pair")
        if self.cfg.data.manifest and Path(self.cfg.data.manifest).exists():
            trained = read_manifest(self.cfg.data.manifest).get("tokenizer_id")
            if trained and trained != tid:
                raise ValueError(f"the model was trained on tokens of {trained} (data.manifest) but "
                                 f"eval.tokenizer={e.tokenizer} is {tid}; decode with the training tokenizer")
        if self.tokenizer.num_classes != mc.num_classes:
            raise ValueError(f"eval.tokenizer has {self.tokenizer.num_classes} codes but model.num_classes="
                             f"{mc.num_classes}; use the tokenizer the model was trained with")
        if tuple(self.heldout.image_tokens.shape[1:]) != (mc.height, mc.width):
            raise ValueError(f"held-out image tokens are {tuple(self.heldout.image_tokens.shape[1:])} but the "
                             f"model samples {mc.height}×{mc.width}")
        n_chunks = len(_chunks(list(range(len(self.heldout))), e.sampler.batch_size))
        if n_chunks < self.r.world:  # a rank without a chunk would have no rows to gather
            raise ValueError(f"eval.num_samples={len(self.heldout)} in batches of eval.sampler.batch_size="
                             f"{e.sampler.batch_size} gives {n_chunks} batches for {self.r.world} ranks; lower "
                             "the batch size or the number of ranks")
        self.notes = M.metric_notes(e.metrics, self.heldout.captions, e.feature_extractor, e.clip_model,
                                    e.clip_weights)
        for name, why in self.notes.items() if self.r.is_main else ():
            print(f"vqd-eval: {name} is {why} (kept out of the metrics)", flush=True)
        if "clip_score" in e.metrics or ("fid" in e.metrics and e.feature_extractor == "clip"):
            self.clip = M.ClipFeatures(e.clip_model, e.clip_weights).to(self.r.device)
        if "fid" in e.metrics:
            self.features = (self.clip if e.feature_extractor == "clip" else
                             M.FEATURE_EXTRACTORS[e.feature_extractor](e.clip_model, e.clip_weights,
                                                                       e.feature_weights).to(self.r.device))

    # -- one checkpoint -------------------------------------------------------------------------
    def __call__(self, step: int, ckpt_dir: Path) -> dict:
        info = read_complete(ckpt_dir)
        if "model" in info:
            check_same_model(info["model"], self.task.model_config, str(ckpt_dir))
        which = "ema" if (Path(ckpt_dir) / EMA_FILE).exists() else "model"
        self._load(load_weights(ckpt_dir, which), ckpt_dir)
        start = time.monotonic()
        computed, grid = self._vqd() if self.cfg.task == "vqd" else self._prior()
        seconds = time.monotonic() - start
        # numbers of metrics that mean nothing here are kept apart, labelled, never shown as metrics
        metrics = {k: v for k, v in computed.items() if k not in self.notes}
        result = {"step": step, "samples_seen": info.get("samples_seen"), "task": self.cfg.task,
                  "checkpoint": str(ckpt_dir), "weights": which, "num_samples": len(self.heldout),
                  "world_size": self.r.world, "seconds": seconds, "autocast": str(self.autocast),
                  "time": time.time(), "metrics": metrics, "requested_metrics": list(self.cfg.eval.metrics),
                  "not_meaningful": {k: v for k, v in computed.items() if k in self.notes}, "metric_notes": self.notes,
                  "sampler": self._sampler_settings(),
                  "feature_extractor": self.cfg.eval.feature_extractor, "clip_model": self.cfg.eval.clip_model}
        if self.r.is_main:
            self._write(step, result, grid)
        return result

    def _sampler_settings(self) -> dict:
        """What made the samples (eval overrides may change it): eval.sampler, or the prior's shifted sampling."""
        if self.cfg.task == "vqd":
            return dataclasses.asdict(self.cfg.eval.sampler)
        s = self.cfg.shifted
        return {"steps": list(self.cfg.eval.prior_steps), "guidance_scale": s.guidance_scale, "kappa": s.kappa,
                "sample_variance": s.sample_variance, "clamp_x0": s.clamp_x0, "shifted": s.shifted}

    def _load(self, state: dict, ckpt_dir: Path) -> None:
        """Load checkpoint weights; buffers may be absent (the EMA holds parameters only, and buffers such
        as the prior's mixture come from the config at build time), parameters may not."""
        module = self.task.module
        missing, unexpected = module.load_state_dict(state, strict=False)
        params = {name for name, _ in module.named_parameters()}
        missing_params = [k for k in missing if k in params]
        if missing_params or unexpected:
            raise ValueError(f"{ckpt_dir}: weights do not fit the model built from the run's config "
                             f"(missing {missing_params[:4]}, unexpected {unexpected[:4]}); was the config changed?")

    def _generator(self, chunk_id: int) -> torch.Generator:
        # The same noise for every checkpoint and any number of ranks: metric changes come from the weights.
        return torch.Generator(self.r.device).manual_seed(self.cfg.eval.seed * 1_000_003 + chunk_id)

    def _vqd(self) -> tuple[dict, Optional[torch.Tensor]]:
        from vqd_scale.generate import generate

        e, h, mc = self.cfg.eval, self.heldout, self.cfg.model
        n, bs = len(h), e.sampler.batch_size
        feats, clip_rows, attr_rows, grid = [], [], [], []
        for k, chunk in self.r.chunks(n, bs):
            tokens = generate(self.task.module, self.task.text, self.task.diffusion, h.text_tokens[chunk],
                              e.sampler, self._generator(k), autocast_dtype=self.autocast)  # Long[b, N]
            images = self.tokenizer.decode(tokens.view(len(chunk), mc.height, mc.width))  # [b,3,H,W]
            captions = [h.captions[i] for i in chunk]
            img_emb = self.clip(images) if self.clip is not None else None
            if self.features is not None:
                feats.append((img_emb if self.features is self.clip else self.features(images)).double().cpu())
            if "clip_score" in e.metrics:
                clip_rows.append(M.clip_score(img_emb, self.clip.text(captions)).double().cpu())
            if "attributes" in e.metrics and "attributes" not in self.notes:
                attr_rows.append(M.attribute_hits(captions, images.cpu()))
            if self.r.is_main and sum(map(len, grid)) < e.grid_size:
                grid.append(images.cpu())
        out: dict[str, float] = {}
        if self.features is not None:
            fake = self.r.gather_rows(torch.cat(feats), n, bs)
            mu_r, sigma_r = self._reference()
            if self.r.is_main:
                out["fid"] = M.frechet_distance(*M.gaussian_stats(fake), mu_r, sigma_r)
        if clip_rows:
            out["clip_score"] = float(self.r.gather_rows(torch.cat(clip_rows), n, bs).mean())
        if attr_rows:
            out.update(M.attribute_summary(self.r.gather_rows(torch.cat(attr_rows), n, bs)))
        return out, (torch.cat(grid)[:e.grid_size] if grid else None)

    def _reference(self) -> tuple:
        """Real-image statistics: eval.reference_stats, else the decoded held-out tokens' — computed once
        and cached as eval/reference_<hash>.npz (keyed by the records and their tokens, extractor and tokenizer) for restarts."""
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
            bs = e.sampler.batch_size
            rows = [self.features(self.tokenizer.decode(h.image_tokens[c].to(self.r.device))).double().cpu()
                    for _, c in self.r.chunks(len(h), bs)]
            self._ref = M.gaussian_stats(self.r.gather_rows(torch.cat(rows), len(h), bs))
            if self.r.is_main:
                tmp = cache.with_name(f".{cache.stem}.tmp{os.getpid()}.npz")
                M.save_stats(tmp, *self._ref)
                os.replace(tmp, cache)
        return self._ref

    def _prior(self) -> tuple[dict, None]:
        """G's DALLE2-style prior metrics (eval/prior_metrics.py) per global chunk, averaged over all chunks."""
        from vqd_scale.eval.prior_metrics import prior_metrics

        e, h = self.cfg.eval, self.heldout
        n = len(h)
        parts = []
        for k, chunk in self.r.chunks(n, PRIOR_BATCH):
            context, text_emb = self.task.text_inputs(
                {"text_tokens": h.text_tokens[chunk], "text_emb": None if h.text_emb is None else h.text_emb[chunk]})
            parts.append((len(chunk), prior_metrics(self.task.module, self.cfg.shifted, h.image_emb[chunk], text_emb,
                                                    context, steps=e.prior_steps, seed=e.seed * 1_000_003 + k)))
        parts = [p for rank_parts in self.r.gather_objects(parts) for p in rank_parts]
        total = sum(w for w, _ in parts)  # chunk means weighted by chunk size = mean over all pairs
        return {name: sum(w * m[name] for w, m in parts) / total for name in parts[0][1]}, None

    # -- outputs (rank 0) ---------------------------------------------------------------------------
    def _write(self, step: int, result: dict, grid: Optional[torch.Tensor]) -> None:
        eval_dir = self.run_dir / EVAL_DIR
        png = None
        if grid is not None:
            png = plots.save_grid(grid, eval_dir / f"{step}.png")
            result["grid"] = png.name
        write_json_atomic(result_path(self.run_dir, step), result)  # last: marks the step evaluated
        try:
            plots.plot_curves(self.run_dir, eval_dir / "curves.png")
        except Exception as err:  # a plot must never lose an evaluation that is already written
            log.warning("curves.png not updated: %s", err)
        self._log_wandb(step, result, png)
        summary = " ".join([f"{k}={v:.4g}" for k, v in result["metrics"].items() if isinstance(v, float)] +
                           [f"{k}: {why.split(':')[0]}" for k, why in result["metric_notes"].items()])
        print(f"[eval step {step}] {summary} ({result['seconds']:.1f}s)", flush=True)

    def _log_wandb(self, step: int, result: dict, png: Optional[Path]) -> None:
        lc = self.cfg.logging
        mode = os.environ.get("WANDB_MODE", lc.wandb_mode)
        if mode == "disabled":
            return
        import wandb
        if self._wandb is None:
            os.environ.setdefault("WANDB_SILENT", "true")
            # Its own run next to training's (a wandb run takes one writer), one per evaluator job.
            run_id, group = wandb_run(self.run_dir)
            self._wandb = wandb.init(project=lc.wandb_project, entity=lc.wandb_entity, mode=mode,
                                     dir=str(self.run_dir / EVAL_DIR), id=run_id, group=group, resume="allow",
                                     job_type="eval", config={"eval": dataclasses.asdict(self.cfg.eval)})
            # Checkpoints may be evaluated out of order: plot against the train step, not wandb's own.
            self._wandb.define_metric("trainer/step")
            self._wandb.define_metric("eval/*", step_metric="trainer/step")
        payload = {"trainer/step": step, **{f"eval/{k}": v for k, v in result["metrics"].items()}}
        if png is not None:
            payload["eval/samples"] = wandb.Image(str(png))
        self._wandb.log(payload)

    def close(self) -> None:
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None

