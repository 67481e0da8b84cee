"""The run directory around a training run: refusals every rank can reach alone before the process group
(unwritable), and what rank 0 decides right after it and every rank raises alike (lock, free space, the
run's files, the hash check of the resume checkpoint)."""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import save as save_safetensors

from vqd_scale import distributed as D
from vqd_scale.config import save_config
from vqd_scale.families import RunConfig
from vqd_scale.errors import UserError
from vqd_scale.train import checkpoint as ckpt_io
from vqd_scale.train import run_lock
from vqd_scale.train.checkpoint import DONE_FILE, TEXT_FILE
from vqd_scale.train.disk_space import SKIP_SPACE_CHECK_ENV, no_space_message, out_of_space, space_problem


def check_writable(run_dir: Path) -> None:
    """Refuse a run_dir that cannot be created or written (its nearest existing ancestor decides), on every
    rank alike; rank 0's own attempt after the process group starts has the last word."""
    where = run_dir
    while not where.exists() and where != where.parent:
        where = where.parent
    if not where.is_dir() or not os.access(where, os.W_OK | os.X_OK):
        why = "Not a directory" if not where.is_dir() else "Permission denied"
        raise UserError(f"run_dir {run_dir} cannot be written ({why}: {where}); choose a directory this job "
                         "may create files in")


def prepare(cfg: RunConfig, run_dir: Path, env: D.DistEnv, task, need: int) -> Optional[run_lock.RunLock]:
    """Rank 0 creates and locks the run directory, checks its free space and writes the run's files there;
    a refusal (locked, unwritable, full) is raised on every rank alike."""
    lock, problem = None, None
    if env.is_main:
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            lock = run_lock.acquire(run_dir)
            if not os.environ.get(SKIP_SPACE_CHECK_ENV):
                problem = space_problem(run_dir, need, ckpt_io.latest_name(run_dir))
            if problem is None:
                save_config(cfg, run_dir / "config.yaml")
                (run_dir / DONE_FILE).unlink(missing_ok=True)  # training (again) in progress
                text = getattr(task, "text", None)
                if text is not None and not cfg.text.pretrained:
                    write_text_tower(text, run_dir / TEXT_FILE)
        except run_lock.RunDirLocked as e:
            problem = str(e)
        except Exception as e:  # safetensors and torch.save report a full disk as their own errors
            if not out_of_space(e, run_dir):
                if not isinstance(e, OSError):
                    raise
                problem = (f"run_dir {run_dir} cannot be written ({e.strerror}: {e.filename}); choose a "
                           "directory this job may create files in")
            else:
                problem = no_space_message(run_dir, need, ckpt_io.latest_name(run_dir))
    problem = D.from_main(problem)
    if problem is not None:
        if lock is not None:
            lock.release()
        raise ckpt_io.NoSpaceError(problem) if problem.startswith("no disk space") else run_lock.RunDirLocked(problem)
    return lock


def write_text_tower(text: torch.nn.Module, path: Path) -> None:
    """Random-init text tower (tests/demo): readers of the run dir load it from here. The same seed draws the
    same tower on every resume, so an identical file is left alone (no rewrite, no extra space)."""
    blob = save_safetensors({k: v.contiguous() for k, v in text.state_dict().items()})
    if not path.is_file() or path.stat().st_size != len(blob) or path.read_bytes() != blob:
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        try:
            tmp.write_bytes(blob)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)  # a write cut short by a full disk leaves no half file behind


def verified_resume(candidates: list[Path], resume: str, env: D.DistEnv, task, run_dir: Path) -> Optional[Path]:
    """The first candidate whose file hashes match complete.json (the check split over the ranks); under
    `--resume auto` a damaged one is set aside with a warning and the previous one tried."""
    for ckpt in candidates:
        bad = [b for part in D.all_gather_object(ckpt_io.damaged_among(ckpt, env.rank, env.world_size)) for b in part]
        if not bad:
            ckpt_io.check_same_model(ckpt_io.read_complete(ckpt)["model"], task.model_config, str(ckpt))
            if resume == "auto" and env.is_main:  # newer ones were skipped as damaged (sizes): out of the way too
                step = ckpt_io.read_complete(ckpt)["step"]
                for newer_step, newer in ckpt_io.list_complete(run_dir):
                    if newer_step > step:
                        ckpt_io.set_aside(newer)
            D.barrier()
            return ckpt
        if resume != "auto":
            raise ckpt_io.CheckpointError(f"checkpoint {ckpt} is damaged: {'; '.join(bad)}; resume from another one")
        if env.is_main:
            dest = ckpt_io.set_aside(ckpt)
            warnings.warn(f"checkpoint {ckpt} is damaged ({'; '.join(bad)}); set aside as {dest.name}, resuming "
                          "from the previous complete checkpoint", stacklevel=1)
        D.barrier()
    if candidates:
        raise ckpt_io.CheckpointError(f"every checkpoint in {run_dir / ckpt_io.CKPT_DIR} is damaged; restore one "
                                      "or start a new run_dir")
    return None
