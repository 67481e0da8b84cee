"""The training loop: build task + DeepSpeed engine + loader, resume, step, log, checkpoint, stop on signals.

Order of setup: everything that files and the config alone can refuse (data, precision, resume
checkpoint, model size, --init-from, an unwritable run_dir) is refused on every rank before the process
group starts; what only one process may decide (the run-directory lock, disk space, the hash check of
the resume checkpoint: train/run_dir.py) is decided right after it and raised on every rank alike,
before the engine is built.
"""
from __future__ import annotations

import dataclasses
import math
import os
import random
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from vqd_scale import distributed as D
from vqd_scale.config import to_dict
from vqd_scale.families import RunConfig
from vqd_scale.errors import MissingInput, UserError
from vqd_scale import families
from vqd_scale.train import checkpoint as ckpt_io
from vqd_scale.train import run_dir as run_dir_io
from vqd_scale.train.checkpoint import DONE_FILE
from vqd_scale.train.disk_space import SKIP_SPACE_CHECK_ENV, estimate_bytes, space_problem
from vqd_scale.train.ema import EMA
from vqd_scale.train.engine import build_engine, fp32_master, resolve_precision, set_fp32_master
from vqd_scale.train.lr_schedule import lr_at, set_lr
from vqd_scale.train.metrics import MetricsLogger, peak_flops, peak_memory_mb
from vqd_scale.train.signals import EXIT_PREEMPTED, StopFlag

EXIT_NONFINITE = 3  # the loss or gradient norm stopped being finite: stopped without saving that step


@dataclass
class TrainState:
    step: int = 0
    samples_seen: int = 0


def data_config(data, needs):
    """The loader's DataConfig for a family's needs (embeddings loaded whenever the family reads them)."""
    return dataclasses.replace(data, with_embeddings=data.with_embeddings or needs.embeddings)


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _step_seed(seed: int, rank: int, step: int, micro: int) -> int:
    # A generator re-seeded per (rank, step, micro-step) needs no state to resume exactly.
    return (seed * 1_000_003 + rank * 7_919 + step * 131 + micro) % 2**63


def _init_hint(init_from: Path, cfg) -> str:
    """What to set so the run's model matches `--init-from` weights (the family knows, from their sidecar)."""
    sidecar = init_from.with_suffix(".yaml")  # the model section `vqd-export import` writes beside W.safetensors
    hint = families.get(cfg.task).init_hint
    if hint is None or not init_from.is_file() or not sidecar.is_file():
        return f"set the {cfg.task} model's config section to the weights' model (size, layers, dim, heads, widths)"
    return hint(cfg, sidecar)


def _load_init_from(init_from: str, module: torch.nn.Module, cfg: RunConfig) -> None:
    """Load `--init-from` weights (a .safetensors, e.g. from `vqd-export import`, or a checkpoint's EMA)."""
    p = Path(init_from)
    if not p.exists():
        raise MissingInput(f"--init-from {init_from}: no such weights file or checkpoint directory")
    sd = ckpt_io.load_weights(p, "ema") if p.is_dir() else load_file(str(p))
    own = module.state_dict()
    # Named shape/key differences first: load_state_dict's own message is one line per tensor.
    wrong = [f"{k} {tuple(sd[k].shape)} vs {tuple(v.shape)}" for k, v in own.items() if k in sd and sd[k].shape != v.shape]
    missing, extra = sorted(set(own) - set(sd)), sorted(set(sd) - set(own))
    if wrong or missing or extra:
        raise UserError(f"--init-from {init_from} holds weights of another model (shape weights vs this run: "
                         f"{', '.join(wrong[:3]) or 'none'}; missing {missing[:3]}; unexpected {extra[:3]}): "
                         f"{_init_hint(p, cfg)}")
    _load_module_weights(module, sd, init_from)


def _load_module_weights(module: torch.nn.Module, sd: dict, where: str) -> None:
    try:
        module.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise UserError(f"weights from {where} do not fit this model: {str(e).splitlines()[0]} ...; "
                         "check model.size / num_classes / context_dim") from None


def run(cfg: RunConfig, resume: Optional[str] = None, init_from: Optional[str] = None) -> int:
    """Train until `max_samples` (exit 0) or a preemption signal (checkpoint, exit EXIT_PREEMPTED)."""
    # Installed first: a signal during setup (a DeepSpeed op build, a slow wandb start) must not kill
    # the rank outright; it is honoured at the first step boundary like any other.
    stop = StopFlag().install()
    try:
        return _setup_and_loop(cfg, resume, init_from, stop)
    finally:
        stop.restore()


def _setup_and_loop(cfg: RunConfig, resume: Optional[str], init_from: Optional[str], stop: StopFlag) -> int:
    """Build everything on every rank (resuming when asked), then run the loop."""
    env = D.detect_env()
    resume = cfg.checkpoint.resume if resume is None else resume
    init_from = cfg.checkpoint.init_from if init_from is None else init_from
    run_dir = Path(cfg.run_dir)
    family = families.get(cfg.task)
    cfg = family.resolve(cfg)  # data-dependent settings (K, token grid, embedding width) from the manifests
    device = D.device_for(env)
    precision = resolve_precision(cfg.deepspeed, device)  # bf16 asked for on a CPU is refused here
    run_dir_io.check_writable(run_dir)
    from vqd_scale.data.loader import build_loader
    # Condition dropout (for classifier-free guidance) is drawn by the loader so it resumes exactly.
    loader = build_loader(data_config(cfg.data, family.needs), rank=env.rank, world_size=env.world_size,
                          dropout=family.dropout(cfg), captions=family.needs.captions)
    candidates = ckpt_io.resume_candidates(run_dir, resume, quiet=not env.is_main)
    # Same seed on every rank while building: a random-init frozen text tower must be identical on all
    # ranks, and ZeRO-3 partitions each rank's own initial copy (no broadcast from rank 0).
    _seed_all(cfg.seed)
    task = family.build_task(cfg, device)
    if candidates:  # refuse another model (e.g. size) before any process group exists
        ckpt_io.check_same_model(ckpt_io.read_complete(candidates[0])["model"], task.model_config, str(candidates[0]))
        if init_from and env.is_main:
            print(f"--init-from {init_from} ignored: resuming from {candidates[0]}", flush=True)
    elif init_from:  # before the process group and the engine: wrong weights fail fast, on every rank alike
        _load_init_from(init_from, task.module, cfg)
    need = (ckpt_io.checkpoint_bytes(candidates[0]) if candidates else
            estimate_bytes(sum(p.numel() for p in task.module.parameters()), cfg.deepspeed.zero_stage, precision))
    D.init_distributed(env)
    try:
        lock = run_dir_io.prepare(cfg, run_dir, env, task, need)
        try:
            ckpt = run_dir_io.verified_resume(candidates, resume, env, task, run_dir)
            return _build_and_loop(cfg, env, device, task, loader, ckpt, run_dir, need, stop)
        finally:
            if lock is not None:
                lock.release()
    finally:
        D.shutdown()


def _build_and_loop(cfg, env, device, task, loader, ckpt: Optional[Path], run_dir: Path, need: int, stop) -> int:
    """Engine, EMA and restored state on every rank (the run directory is locked), then the loop."""
    _seed_all(cfg.seed + env.rank)  # per-rank randomness (dropout) from here on
    config_yaml = OmegaConf.to_yaml(OmegaConf.structured(cfg))
    trainer_saved = ckpt_io.load_trainer_state(ckpt) if ckpt is not None else None
    same_world = trainer_saved is not None and trainer_saved["world_size"] == env.world_size
    if trainer_saved is not None and not same_world:
        # ZeRO shards are tied to the world size: restart the optimizer from consolidated weights.
        warnings.warn(f"checkpoint {ckpt} was written by {trainer_saved['world_size']} ranks, this run has "
                      f"{env.world_size}: loading consolidated weights; optimizer state is REBUILT and the "
                      f"data loader continues after the {trainer_saved['samples_seen']} samples seen (at the "
                      "positions of this world size)", stacklevel=1)
        consolidated = ckpt_io.load_weights(ckpt, "model")
        _load_module_weights(task.module, consolidated, str(ckpt))
    engine, precision = build_engine(task.module, cfg.deepspeed, cfg.optim, cfg.data.batch_size,
                                     env.world_size, device)
    if trainer_saved is not None and not same_world:
        set_fp32_master(engine, consolidated)  # 16-bit runs: the master copy was made from rounded weights
    ema = EMA(cfg.optim.ema_decay, cfg.optim.ema_every, keep=env.is_main)
    ema.init_from(engine.module, fp32_master(engine))
    state = TrainState()
    if trainer_saved is not None:
        state = TrainState(trainer_saved["step"], trainer_saved["samples_seen"])
        task.load_state_dict(trainer_saved["task"])
        if env.is_main:
            ema.load_state_dict(ckpt_io.load_ema(ckpt), device)
        if same_world:
            engine.load_checkpoint(str(ckpt.parent), tag=ckpt.name, load_optimizer_states=True,
                                   load_lr_scheduler_states=False)
            rank_state = ckpt_io.load_rank_state(ckpt, env.rank)
            _restore_loader(loader, rank_state.get("loader"), state.samples_seen)
            ckpt_io.set_rng_state(rank_state["rng"])  # last: nothing below draws from the global RNGs
        else:
            loader.seek(state.samples_seen)
            _seed_all(cfg.seed + env.rank + 7_777 * state.step)  # fresh randomness, not a replay of step 0
        if env.is_main:
            print(f"resumed from {ckpt} at step {state.step} ({state.samples_seen} samples)", flush=True)

    logger = MetricsLogger(cfg.logging, run_dir, env.is_main, to_dict(cfg), state.step)
    try:
        return _loop(cfg, env, device, task, engine, ema, loader, state, logger, stop, run_dir, config_yaml, need,
                     precision)
    finally:
        logger.close()


def _clipped(grad_norm, clip: float, device: torch.device) -> torch.Tensor:
    """1 if this optimizer step's (pre-clip) grad norm exceeded grad_clip, else 0; stays on the device."""
    if grad_norm is None or clip <= 0:
        return torch.zeros((), device=device)
    return (torch.as_tensor(grad_norm, device=device) > clip).float()


def _restore_loader(loader, saved: Optional[dict], samples_seen: int) -> None:
    """The saved loader position; one of an older format continues after the samples seen instead."""
    from vqd_scale.data.loader import STATE_VERSION
    if saved is None:
        return
    if saved.get("version") != STATE_VERSION:
        warnings.warn(f"the checkpoint's data loader state has format {saved.get('version')}, this version "
                      f"reads {STATE_VERSION}: the data continues after the {samples_seen} samples seen, not at "
                      "the exact saved position", stacklevel=2)
        loader.seek(samples_seen)
        return
    loader.load_state_dict(saved)


def _save(cfg, env, engine, ema, task, loader, state, run_dir, config_yaml, need: int) -> Path:
    """Checkpoint (collective); refused on every rank when rank 0 sees too little free space for one."""
    problem = None
    if env.is_main and not os.environ.get(SKIP_SPACE_CHECK_ENV):
        problem = space_problem(run_dir, need, ckpt_io.latest_name(run_dir))
    problem = D.from_main(problem)
    if problem is not None:
        raise ckpt_io.NoSpaceError(problem)
    trainer_state = {"step": state.step, "samples_seen": state.samples_seen, "world_size": env.world_size,
                     "zero_stage": cfg.deepspeed.zero_stage, "task": task.state_dict(),
                     "model_config": task.model_config, "config": to_dict(cfg)}
    rank_state = {"rng": ckpt_io.rng_state(),
                  "loader": loader.state_dict() if hasattr(loader, "state_dict") else None}
    return ckpt_io.save_checkpoint(run_dir, state.step, engine, env.rank, env.world_size, trainer_state, rank_state,
                                   ema.state_dict() if env.is_main else None, config_yaml,
                                   cfg.checkpoint.keep_last, cfg.checkpoint.milestone_every, need)


def _loop(cfg, env, device, task, engine, ema, loader, state, logger, stop, run_dir, config_yaml, need,
          precision) -> int:
    accum, global_batch = cfg.deepspeed.grad_accum, cfg.data.batch_size * env.world_size
    gen = torch.Generator(device=device)
    peak = peak_flops(device, precision)
    master = fp32_master(engine)
    it = iter(loader)
    last_save = last_log = time.monotonic()
    acc: dict[str, torch.Tensor] = {}  # running sums of the task's scalar metrics over the log interval
    n_acc, wait, samples_at_log, steps_at_log = 0, 0.0, state.samples_seen, state.step
    clipped = torch.zeros((), device=device)  # optimizer steps whose grad norm exceeded grad_clip
    while state.samples_seen < cfg.max_samples:
        # ---- one optimizer step (accum micro-steps) --------------------------------------------
        lr = lr_at(state.samples_seen, cfg.optim, cfg.max_samples)
        set_lr(engine.optimizer, lr)
        finite = torch.ones((), dtype=torch.bool, device=device)
        for micro in range(accum):
            t0 = time.monotonic()
            try:
                batch = next(it)
            except StopIteration:  # end of a (virtual) epoch: every rank ends together (with_epoch)
                it = iter(loader)
                batch = next(it)
            wait += time.monotonic() - t0
            gen.manual_seed(_step_seed(cfg.seed, env.rank, state.step, micro))
            loss, m = task.loss(engine, batch, gen)
            finite &= torch.isfinite(loss.detach()).all()  # checked once per step, in the collective below
            engine.backward(loss)
            engine.step()  # DeepSpeed steps the optimizer (clip + AdamW) only at the accumulation boundary
            task.after_step({k: D.all_gather_cat(m[k]) for k in task.gather_keys})
            for k, v in m.items():
                if k not in task.gather_keys and v.dim() == 0:
                    acc[k] = acc.get(k, 0.0) + v.float()
            n_acc += 1
            state.samples_seen += global_batch
        state.step += 1
        clipped += _clipped(engine.get_global_grad_norm(), cfg.optim.grad_clip, device)
        ema.maybe_update(engine.module, state.step, master)
        # ---- logging ---------------------------------------------------------------------------
        final = state.samples_seen >= cfg.max_samples
        if state.step % cfg.logging.every_steps == 0 or final:
            now = time.monotonic()
            keys = sorted(acc)  # same keys in the same order on every rank
            means = (D.mean_over_ranks(torch.stack([acc[k] for k in keys])) / n_acc).tolist()
            sps = (state.samples_seen - samples_at_log) / max(now - last_log, 1e-9)
            grad_norm = engine.get_global_grad_norm()
            metrics = {**dict(zip(keys, means)), "lr": lr,
                       "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
                       "clip_frac": float(clipped) / max(state.step - steps_at_log, 1),
                       "samples_seen": state.samples_seen, "samples_per_s": sps,
                       "tokens_per_s": sps * task.tokens_per_sample, "data_wait": wait / max(now - last_log, 1e-9),
                       "peak_mem_mb": peak_memory_mb(device)}
            if peak:  # model FLOPs (MFU) and with activation-checkpointing recompute (HFU): models/flops.py
                metrics["mfu"] = task.flops.model * sps / (peak * env.world_size)
                metrics["hfu"] = task.flops.hardware * sps / (peak * env.world_size)
            logger.log(state.step, metrics)
            acc.clear()
            clipped.zero_()
            n_acc, wait, last_log, samples_at_log, steps_at_log = 0, 0.0, now, state.samples_seen, state.step
        # ---- checkpoint / stop: every rank must agree, so decide in one collective ----------------
        due_time = env.is_main and time.monotonic() - last_save >= cfg.checkpoint.every_minutes * 60
        grad_norm = engine.get_global_grad_norm()
        finite_step = bool(finite) and (grad_norm is None or math.isfinite(float(grad_norm)))
        stop_now, due, diverged = D.agree([stop.raised, due_time or state.step % cfg.checkpoint.every_steps == 0,
                                           not finite_step], device)
        if diverged:
            return _stop_nonfinite(env, state, run_dir)
        if due or stop_now or final:
            path = _save(cfg, env, engine, ema, task, loader, state, run_dir, config_yaml, need)
            need = ckpt_io.checkpoint_bytes(path) if env.is_main else need  # rank 0 checks the space
            last_save = time.monotonic()
            if env.is_main:
                print(f"checkpoint {path}", flush=True)
        if stop_now and not final:  # at the final step the run is over: exit 0, nothing to requeue
            if env.is_main:
                who = f"signal {stop.signum}" if stop.raised else "a signal on another rank"
                print(f"preemption ({who}): checkpoint written at step {state.step}; exiting "
                      f"with code {EXIT_PREEMPTED} for requeue", flush=True)
            return EXIT_PREEMPTED
    if env.is_main:
        (run_dir / DONE_FILE).write_text(f"{state.step} {state.samples_seen}\n")
    return 0


def _stop_nonfinite(env: D.DistEnv, state: TrainState, run_dir: Path) -> int:
    """A NaN/inf loss or gradient norm: nothing from this step is saved, the newest checkpoint stays the last good one."""
    if env.is_main:
        latest = ckpt_io.latest_name(run_dir)
        kept = f"the newest checkpoint {run_dir / ckpt_io.CKPT_DIR / latest}" if latest else "no checkpoint yet"
        print(f"training stopped at step {state.step}: the loss or gradient norm is not finite (on some rank); "
              f"this step was not saved and {kept} holds the last good weights. Lower optim.lr or check the "
              f"data, then resume (--resume auto continues from it); exit code {EXIT_NONFINITE}", file=sys.stderr,
              flush=True)
    return EXIT_NONFINITE
