"""The separately scheduled eval job, shared by every model family: load a complete checkpoint's EMA
weights into the family's evaluator, let it sample and score the held-out set (rank-parallel when
launched with several ranks), and write `eval/<step>.json`, `eval/<step>.png`, `eval/curves.png` and a
wandb entry keyed by the train step.

Which checkpoint to evaluate (once each, claims, --watch) is `eval/watch.py`'s; what a family samples
and measures is its `evaluator` (families/<name>/evaluate.py). Everything loaded once (held-out data,
text tower, tokenizer, feature extractors, reference statistics) is kept across checkpoints.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import time
from pathlib import Path
from typing import Optional


from vqd_scale import families
from vqd_scale.data.schema import write_json_atomic
from vqd_scale.errors import UserError
from vqd_scale.eval import plots
from vqd_scale.eval.heldout import read_heldout
from vqd_scale.eval.ranks import Ranks, setup_ranks  # noqa: F401  (setup_ranks: the CLI's entry point)
from vqd_scale.eval.watch import result_path, wandb_run
from vqd_scale.families.base import Grid
from vqd_scale.rundir import EMA_FILE, EVAL_DIR, TEXT_FILE, check_same_model, load_weights, read_complete

log = logging.getLogger(__name__)


class EvalJob:
    """Callable `(step, ckpt_dir) -> result dict` for `watch.run`; results are written on rank 0."""

    def __init__(self, cfg, run_dir: str | os.PathLike, ranks: Optional[Ranks] = None):
        self.cfg, self.run_dir, self.r = cfg, Path(run_dir), ranks or Ranks()
        self.heldout = read_heldout(cfg.eval.shards, cfg.eval.num_samples)
        self.impl = families.get(cfg.task).evaluator(cfg, self.run_dir, self.r, self.heldout)
        self._load_text_tower()
        self.impl.module.to(self.r.device).eval().requires_grad_(False)
        self._wandb = None
        (self.run_dir / EVAL_DIR).mkdir(parents=True, exist_ok=True)

    def _load_text_tower(self) -> None:
        """Without text.pretrained, training saved its random-init frozen tower in the run dir: use it."""
        text, path = self.impl.text, self.run_dir / TEXT_FILE
        if text is None or self.cfg.text.pretrained:
            return
        if path.is_file():
            from safetensors.torch import load_file
            text.load_state_dict(load_file(str(path), device=str(self.r.device)))
        else:
            log.warning("text.pretrained is unset and %s is missing: using a text tower re-initialised from "
                        "seed %d, which matches training only if it was built the same way", path, self.cfg.seed)

    # -- one checkpoint -------------------------------------------------------------------------
    def __call__(self, step: int, ckpt_dir: Path) -> dict:
        info = read_complete(ckpt_dir)
        if "model" in info:
            check_same_model(info["model"], self.impl.model_config, str(ckpt_dir))
        which = "ema" if (Path(ckpt_dir) / EMA_FILE).exists() else "model"
        self._load(load_weights(ckpt_dir, which), ckpt_dir)
        start = time.monotonic()
        computed, grid = self.impl.evaluate()
        seconds = time.monotonic() - start
        notes = self.impl.notes
        # numbers of metrics that mean nothing here are kept apart, labelled, never shown as metrics
        metrics = {k: v for k, v in computed.items() if k not in notes}
        result = {"step": step, "samples_seen": info.get("samples_seen"), "task": self.cfg.task,
                  "checkpoint": str(ckpt_dir), "weights": which, "num_samples": len(self.heldout),
                  "world_size": self.r.world, "seconds": seconds, "autocast": str(self.impl.autocast),
                  "time": time.time(), "metrics": metrics, "requested_metrics": list(self.cfg.eval.metrics),
                  "not_meaningful": {k: v for k, v in computed.items() if k in notes}, "metric_notes": notes,
                  "sampler": self.impl.sampler_settings(),
                  "feature_extractor": self.cfg.eval.feature_extractor, "clip_model": self.cfg.eval.clip_model}
        if self.r.is_main:
            self._write(step, result, grid)
        return result

    def _load(self, state: dict, ckpt_dir: Path) -> None:
        """Load checkpoint weights; buffers may be absent (the EMA holds parameters only), parameters may not."""
        module = self.impl.module
        missing, unexpected = module.load_state_dict(state, strict=False)
        params = {name for name, _ in module.named_parameters()}
        missing_params = [k for k in missing if k in params]
        if missing_params or unexpected:
            raise UserError(f"{ckpt_dir}: weights do not fit the model built from the run's config "
                            f"(missing {missing_params[:4]}, unexpected {unexpected[:4]}); was the config changed?")

    # -- outputs (rank 0) ---------------------------------------------------------------------------
    def _write(self, step: int, result: dict, grid: Optional[Grid]) -> None:
        eval_dir = self.run_dir / EVAL_DIR
        png = None
        if grid is not None:  # each sample with its caption under it and its held-out reference beside it
            scale = max(1, 128 // grid.images.shape[-1])  # small images upscaled so a caption fits under them
            png = plots.save_grid(grid.images, eval_dir / f"{step}.png", captions=grid.captions,
                                  references=grid.references, scale=scale, pad=4 if grid.captions else 2)
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

