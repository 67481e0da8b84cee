"""The training loop: build task + DeepSpeed engine + loader, resume, step, log, checkpoint, stop on signals."""
from __future__ import annotations

import dataclasses
import random
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file

from vqd_scale.config import RunConfig, save_config, to_dict
from vqd_scale.tasks import build_task
from vqd_scale.train import checkpoint as ckpt_io
from vqd_scale.train import distributed as D
from vqd_scale.train.ema import EMA
from vqd_scale.train.engine import build_engine, fp32_master, set_fp32_master
from vqd_scale.train.lr_schedule import lr_at, set_lr
from vqd_scale.train.metrics import MetricsLogger, peak_flops, peak_memory_mb
from vqd_scale.train.checkpoint import DONE_FILE, TEXT_FILE
from vqd_scale.train.signals import EXIT_PREEMPTED, StopFlag


@dataclass
class TrainState:
    step: int = 0
    samples_seen: int = 0


def resolve_data_dependent(cfg: RunConfig) -> RunConfig:
    """Fill model.num_classes / height / width from the token manifest and check the tokenizer id."""
    if cfg.task != "vqd" or cfg.data.manifest is None:
        if cfg.task == "vqd" and cfg.model.num_classes < 2:
            raise ValueError("model.num_classes is 0 and data.manifest is unset: set data.manifest to the "
                             "token manifest written by vqd-extract, or model.num_classes explicitly")
        return cfg
    from vqd_scale.data.schema import read_manifest
    m = read_manifest(cfg.data.manifest)
    if cfg.data.tokenizer_id and m.get("tokenizer_id") != cfg.data.tokenizer_id:
        raise ValueError(f"data.tokenizer_id={cfg.data.tokenizer_id!r} but the manifest {cfg.data.manifest} was "
                         f"extracted with {m.get('tokenizer_id')!r}; re-extract or fix data.tokenizer_id")
    K, (h, w) = int(m["num_classes"]), m["token_shape"]
    if cfg.model.num_classes not in (0, K):
        raise ValueError(f"model.num_classes={cfg.model.num_classes} but the token manifest says K={K}; "
                         "set model.num_classes=0 to take it from the manifest")
    if (cfg.model.height, cfg.model.width) != (h, w):
        raise ValueError(f"model.height/width = {cfg.model.height}x{cfg.model.width} but the tokens are {h}x{w}; "
                         f"set model.height={h} model.width={w}")
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, num_classes=K))


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _step_seed(seed: int, rank: int, step: int, micro: int) -> int:
    # A generator re-seeded per (rank, step, micro-step) needs no state to resume exactly.
    return (seed * 1_000_003 + rank * 7_919 + step * 131 + micro) % 2**63


def _init_hint(init_from: Path, cfg: RunConfig) -> str:
    """What to set so the run's model matches `--init-from` weights imported by `vqd-export import`."""
    sidecar = init_from.with_suffix(".yaml")  # the model section `vqd-export import` writes beside W.safetensors
    if cfg.task != "vqd" or not init_from.is_file() or not sidecar.is_file():
        return "set the model section (model.size / layers / dim / heads / num_classes / context_dim) to the weights' model"
    from vqd_scale.config import TransformerConfig
    from vqd_scale.models.transformer import resolve_size
    theirs = TransformerConfig(**OmegaConf.to_container(OmegaConf.load(sidecar))["model"])

    def fields(m: TransformerConfig) -> dict:  # the fields that decide tensor shapes, sizes resolved
        return {**dataclasses.asdict(resolve_size(m)), **{k: getattr(m, k) for k in (
            "num_classes", "height", "width", "context_dim", "context_len", "num_timesteps")}}
    ours, want = fields(cfg.model), fields(theirs)
    fix = " ".join(f"model.{k}={v}" for k, v in want.items() if ours[k] != v)
    return f"set {fix} (from {sidecar}, written by vqd-export import)" if fix else f"compare with {sidecar}"


def _load_init_from(init_from: str, module: torch.nn.Module, cfg: RunConfig) -> None:
    """Load `--init-from` weights (a .safetensors, e.g. from `vqd-export import`, or a checkpoint's EMA)."""
    p = Path(init_from)
    if not p.exists():
        raise FileNotFoundError(f"--init-from {init_from}: no such weights file or checkpoint directory")
    sd = ckpt_io.load_weights(p, "ema") if p.is_dir() else load_file(str(p))
    own = module.state_dict()
    # Named shape/key differences first: load_state_dict's own message is one line per tensor.
    wrong = [f"{k} {tuple(sd[k].shape)} vs {tuple(v.shape)}" for k, v in own.items() if k in sd and sd[k].shape != v.shape]
    missing, extra = sorted(set(own) - set(sd)), sorted(set(sd) - set(own))
    if wrong or missing or extra:
        raise ValueError(f"--init-from {init_from} holds weights of another model (shape weights vs this run: "
                         f"{', '.join(wrong[:3]) or 'none'}; missing {missing[:3]}; unexpected {extra[:3]}): "
                         f"{_init_hint(p, cfg)}")
    _load_module_weights(module, sd, init_from)


def _load_module_weights(module: torch.nn.Module, sd: dict, where: str) -> None:
    try:
        module.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise ValueError(f"weights from {where} do not fit this model: {str(e).splitlines()[0]} ...; "
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
    cfg = resolve_data_dependent(cfg)
    ckpt = ckpt_io.resolve_resume(run_dir, resume)
    device = D.device_for(env)
    # Same seed on every rank while building: a random-init frozen text tower must be identical on all
    # ranks, and ZeRO-3 partitions each rank's own initial copy (no broadcast from rank 0).
    _seed_all(cfg.seed)
    task = build_task(cfg, device)
    if ckpt is not None:  # refuse another model (e.g. size) before any process group exists
        ckpt_io.check_same_model(ckpt_io.read_complete(ckpt)["model"], task.model_config, str(ckpt))
        if init_from and env.is_main:
            print(f"--init-from {init_from} ignored: resuming from {ckpt}", flush=True)
    elif init_from:  # before the process group and the engine: wrong weights fail fast, on every rank alike
        _load_init_from(init_from, task.module, cfg)
    D.init_distributed(env)
    _seed_all(cfg.seed + env.rank)  # per-rank randomness (dropout) from here on
    if env.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
        (run_dir / DONE_FILE).unlink(missing_ok=True)  # training (again) in progress
    config_yaml = OmegaConf.to_yaml(OmegaConf.structured(cfg))
    text = getattr(task, "text", None)
    if env.is_main and text is not None and not cfg.text.pretrained:
        # Random-init text tower (tests/demo): readers of the run dir load it from here.
        save_file({k: v.contiguous() for k, v in text.state_dict().items()}, str(run_dir / TEXT_FILE))
    trainer_saved = ckpt_io.load_trainer_state(ckpt) if ckpt is not None else None
    same_world = trainer_saved is not None and trainer_saved["world_size"] == env.world_size
    if trainer_saved is not None and not same_world:
        # ZeRO shards are tied to the world size: restart the optimizer from consolidated weights.
        warnings.warn(f"checkpoint {ckpt} was written by {trainer_saved['world_size']} ranks, this run has "
                      f"{env.world_size}: loading consolidated weights; optimizer state is REBUILT and the "
                      "data loader restarts at a new position", stacklevel=1)
        consolidated = ckpt_io.load_weights(ckpt, "model")
        _load_module_weights(task.module, consolidated, str(ckpt))
    engine, precision = build_engine(task.module, cfg.deepspeed, cfg.optim, cfg.data.batch_size,
                                     env.world_size, device)
    if trainer_saved is not None and not same_world:
        set_fp32_master(engine, consolidated)  # 16-bit runs: the master copy was made from rounded weights
    ema = EMA(cfg.optim.ema_decay, cfg.optim.ema_every, keep=env.is_main)
    ema.init_from(engine.module, fp32_master(engine))

    from vqd_scale.data.loader import build_loader
    # Caption dropout (for classifier-free guidance) is drawn by the loader so it resumes exactly.
    dropout = cfg.diffusion.caption_dropout if cfg.task == "vqd" else cfg.shifted.text_dropout
    loader = build_loader(cfg.data, rank=env.rank, world_size=env.world_size, caption_dropout=dropout)
    state = TrainState()
    if trainer_saved is not None:
        state = TrainState(trainer_saved["step"], trainer_saved["samples_seen"])
        task.load_state_dict(trainer_saved["task"])
        if env.is_main:
            ema.load_state_dict(load_file(str(ckpt / ckpt_io.EMA_FILE)), device)
        if same_world:
            engine.load_checkpoint(str(ckpt.parent), tag=ckpt.name, load_optimizer_states=True,
                                   load_lr_scheduler_states=False)
            rank_state = ckpt_io.load_rank_state(ckpt, env.rank)
            if rank_state.get("loader") is not None:
                loader.load_state_dict(rank_state["loader"])
            ckpt_io.set_rng_state(rank_state["rng"])  # last: nothing below draws from the global RNGs
        else:
            _seed_all(cfg.seed + env.rank + 7_777 * state.step)  # fresh randomness, not a replay of step 0
        if env.is_main:
            print(f"resumed from {ckpt} at step {state.step} ({state.samples_seen} samples)", flush=True)

    logger = MetricsLogger(cfg.logging, run_dir, env.is_main, to_dict(cfg), state.step)
    try:
        return _loop(cfg, env, device, task, engine, ema, loader, state, logger, stop, run_dir, config_yaml, precision)
    finally:
        logger.close()
        D.shutdown()


def _save(cfg, env, engine, ema, task, loader, state, run_dir, config_yaml) -> Path:
    trainer_state = {"step": state.step, "samples_seen": state.samples_seen, "world_size": env.world_size,
                     "zero_stage": cfg.deepspeed.zero_stage, "task": task.state_dict(),
                     "model_config": task.model_config, "config": to_dict(cfg)}
    rank_state = {"rng": ckpt_io.rng_state(),
                  "loader": loader.state_dict() if hasattr(loader, "state_dict") else None}
    return ckpt_io.save_checkpoint(run_dir, state.step, engine, env.rank, env.world_size, trainer_state, rank_state,
                                   ema.state_dict() if env.is_main else None, config_yaml, D.barrier,
                                   cfg.checkpoint.keep_last, cfg.checkpoint.milestone_every)


def _loop(cfg, env, device, task, engine, ema, loader, state, logger, stop, run_dir, config_yaml, precision) -> int:
    accum, global_batch = cfg.deepspeed.grad_accum, cfg.data.batch_size * env.world_size
    gen = torch.Generator(device=device)
    peak = peak_flops(device, precision)
    master = fp32_master(engine)
    it = iter(loader)
    last_save = last_log = time.monotonic()
    acc: dict[str, torch.Tensor] = {}  # running sums of the task's scalar metrics over the log interval
    n_acc, wait, samples_at_log = 0, 0.0, state.samples_seen
    while state.samples_seen < cfg.max_samples:
        # ---- one optimizer step (accum micro-steps) --------------------------------------------
        lr = lr_at(state.samples_seen, cfg.optim, cfg.max_samples)
        set_lr(engine.optimizer, lr)
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
            engine.backward(loss)
            engine.step()  # DeepSpeed steps the optimizer (clip + AdamW) only at the accumulation boundary
            task.after_step({k: D.all_gather_cat(m[k]) for k in task.gather_keys})
            for k, v in m.items():
                if k not in task.gather_keys and v.dim() == 0:
                    acc[k] = acc.get(k, 0.0) + v.float()
            n_acc += 1
            state.samples_seen += global_batch
        state.step += 1
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
                       "samples_seen": state.samples_seen, "samples_per_s": sps,
                       "tokens_per_s": sps * task.tokens_per_sample, "data_wait": wait / max(now - last_log, 1e-9),
                       "peak_mem_mb": peak_memory_mb(device)}
            if peak:  # model FLOPs (MFU) and with activation-checkpointing recompute (HFU): models/flops.py
                metrics["mfu"] = task.flops.model * sps / (peak * env.world_size)
                metrics["hfu"] = task.flops.hardware * sps / (peak * env.world_size)
            logger.log(state.step, metrics)
            acc.clear()
            n_acc, wait, last_log, samples_at_log = 0, 0.0, now, state.samples_seen
        # ---- checkpoint / stop: every rank must agree, so decide in one collective ----------------
        due_time = env.is_main and time.monotonic() - last_save >= cfg.checkpoint.every_minutes * 60
        stop_now, due = D.agree([stop.raised, due_time or state.step % cfg.checkpoint.every_steps == 0], device)
        if due or stop_now or final:
            path = _save(cfg, env, engine, ema, task, loader, state, run_dir, config_yaml)
            last_save = time.monotonic()
            if env.is_main:
                print(f"checkpoint {path}", flush=True)
        if stop_now:
            if env.is_main:
                who = f"signal {stop.signum}" if stop.raised else "a signal on another rank"
                print(f"preemption ({who}): checkpoint written at step {state.step}; exiting "
                      f"with code {EXIT_PREEMPTED} for requeue", flush=True)
            return EXIT_PREEMPTED
    if env.is_main:
        (run_dir / DONE_FILE).write_text(f"{state.step} {state.samples_seen}\n")
    return 0
