"""Writing checkpoints: atomic completion, retention, resume selection (the reader API is vqd_scale/rundir.py).

RUN_DIR/checkpoints/step_XXXXXXXX/ holds DeepSpeed's ZeRO shards (model + optimizer), our
`trainer_state.pt` (step, samples seen, task state, world size, zero stage), one `rank_XXXXX.pt` per rank
(RNG states, loader state), `config.yaml`, `ema.safetensors` — and `complete.json`, written last
by rank 0 after a barrier. `latest` names the newest complete checkpoint and is replaced atomically
after `complete.json`, so a crash at any point leaves the previous checkpoint loadable and named.

`complete.json` lists every file with its size and SHA-256 (`sha256sum` checks them by hand); each
rank hashes the files it wrote. Resuming checks sizes on every rank and the hashes split over the
ranks; a damaged checkpoint is refused by file name or, under `--resume auto`, set aside
(`step_XXXXXXXX.damaged`) in favour of the previous one. A save that finds too little disk space
stops the run with one line naming the run directory and the space a checkpoint needs, and leaves the
previous checkpoint and `latest` as they were.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import warnings
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from safetensors.torch import save_file

from vqd_scale import distributed as D
from vqd_scale.errors import UserError
from vqd_scale.rundir import (CKPT_DIR, COMPLETE, CONFIG_FILE, DAMAGED_SUFFIX, DONE_FILE, EMA_FILE, LATEST,  # noqa: F401
                              LOCK_FILE, METRICS_FILE, TEXT_FILE, TRAINER_STATE, _STEP_RE, CheckpointError,
                              check_same_model, file_problems, latest_name, list_complete, load_ema, load_weights,
                              read_complete, sha256_file, torch_load, verify)
from vqd_scale.train.disk_space import no_space_message, out_of_space

# rank encoded in the names of the files one rank writes (DeepSpeed's ZeRO shards, our rank states)
_RANK_FILE_RE = re.compile(r"^(?:zero_pp_rank_(\d+)_.*|rank_(\d+)\.pt)$")
# Test hook: SIGKILL after the shards are written but before complete.json (simulates a kill mid-save).
CRASH_ENV = "VQD_TEST_KILL_BEFORE_COMPLETE"  # value: the step whose save is SIGKILLed


class NoSpaceError(UserError):
    """Too little disk space for a checkpoint; the message names the run directory and the space needed."""


def ckpt_name(step: int) -> str:
    return f"step_{step:08d}"


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())  # the rename must not become visible before the data
    os.replace(tmp, path)


def resolve_resume(run_dir: str | os.PathLike, resume: str) -> Optional[Path]:
    """`none` → None; `auto` → newest complete checkpoint (or None); else that path, which must be complete."""
    found = resume_candidates(run_dir, resume)
    return found[0] if found else None


def resume_candidates(run_dir: str | os.PathLike, resume: str, quiet: bool = False) -> list[Path]:
    """Checkpoints to resume from, best first, each complete with its files present at their sizes (hashes
    are checked later, split over the ranks: `damaged_among`). `auto`: every complete one, newest first,
    skipping damaged ones with a warning (refused when all are); a path: just it, refused when damaged."""
    if resume == "none":
        return []
    if resume != "auto":
        p = Path(resume)
        if _STEP_RE.match(p.name) is None and (p / LATEST).is_file():  # a checkpoints/ dir: follow `latest`
            p = p / (p / LATEST).read_text().strip()
        bad = file_problems(p, read_complete(p), hash_names=[])  # raises with a message when incomplete
        if bad:
            raise CheckpointError(f"checkpoint {p} is damaged: {'; '.join(bad)}; resume from another one")
        return [p]
    good, damaged = [], []
    for step, p in reversed(list_complete(run_dir)):
        try:
            bad = file_problems(p, read_complete(p), hash_names=[])
        except CheckpointError as e:
            bad = [str(e)]
        (damaged.append((step, p, bad)) if bad else good.append((step, p)))
    for step, p, bad in damaged if not quiet else []:
        if not good or step > good[0][0]:  # an older damaged one matters only when the newer ones fail too
            warnings.warn(f"checkpoint {p} is damaged ({'; '.join(bad)}); resuming from an older one", stacklevel=2)
    if damaged and not good:
        raise CheckpointError(f"every checkpoint in {Path(run_dir) / CKPT_DIR} is damaged (newest: "
                              f"{'; '.join(damaged[0][2])}); restore one or start a new run_dir")
    return [p for _, p in good]


def damaged_among(ckpt_dir: Path, rank: int, world_size: int) -> list[str]:
    """This rank's share of the hash check of a resume checkpoint (every world_size-th listed file)."""
    names = sorted(read_complete(ckpt_dir).get("files", {}))[rank::world_size]
    return file_problems(ckpt_dir, read_complete(ckpt_dir), hash_names=names)


def set_aside(ckpt_dir: Path) -> Path:
    """Rename a damaged checkpoint so no resume, evaluator or retention rule takes it again; `latest` then
    names the newest complete one left."""
    dest = ckpt_dir.with_name(ckpt_dir.name + DAMAGED_SUFFIX)
    n = 1
    while dest.exists():
        dest, n = ckpt_dir.with_name(f"{ckpt_dir.name}{DAMAGED_SUFFIX}{n}"), n + 1
    os.replace(ckpt_dir, dest)
    run_dir = ckpt_dir.parent.parent
    done = list_complete(run_dir)
    if done and latest_name(run_dir) == ckpt_dir.name:
        _write_atomic(ckpt_dir.parent / LATEST, done[-1][1].name + "\n")
    return dest


def checkpoint_bytes(ckpt_dir: Path) -> int:
    """Bytes a checkpoint takes (recorded in complete.json; summed from the files for older ones)."""
    info = read_complete(ckpt_dir)
    if "bytes" in info:
        return int(info["bytes"])
    return sum(f.stat().st_size for f in ckpt_dir.iterdir() if f.is_file())


def rng_state() -> dict[str, Any]:
    """Every RNG this process draws from (python, numpy, torch CPU, CUDA)."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _owned_files(path: Path, rank: int) -> list[str]:
    """Files of a checkpoint directory that `rank` wrote: those named after it, and everything else for rank 0
    (each rank lists the directory itself; on NFS another node's new files may not be listed yet)."""
    out = []
    for f in path.iterdir():
        m = _RANK_FILE_RE.match(f.name)
        owner = int(next(g for g in m.groups() if g is not None)) if m else 0
        if f.is_file() and owner == rank and f.name != COMPLETE and not f.name.startswith("."):
            out.append(f.name)
    return sorted(out)


def save_checkpoint(run_dir: Path, step: int, engine, rank: int, world_size: int, trainer_state: dict,
                    rank_state: dict, ema_state: Optional[dict[str, torch.Tensor]], config_yaml: str,
                    keep_last: int, milestone_every: int, need_bytes: int) -> Path:
    """Write one checkpoint from every rank (collective); returns its directory. Out of disk space: removes
    the partial directory and raises NoSpaceError on every rank (`latest` still names the previous one)."""
    root = run_dir / CKPT_DIR
    name = ckpt_name(step)
    path = root / name
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        if path.exists():  # leftovers of an interrupted save of this same step
            shutil.rmtree(path)
    D.all_gather_object(None)
    try:
        # DeepSpeed writes the ZeRO shards of every rank into root/name (collective).
        engine.save_checkpoint(str(root), tag=name, save_latest=False)
    except Exception as e:
        # Its collectives cannot be rejoined from here: this rank stops with the message (a one-process run
        # cleanly; with several ranks the others stop when their next collective finds it gone).
        if out_of_space(e, root):
            if world_size == 1:
                shutil.rmtree(path, ignore_errors=True)
            raise NoSpaceError(no_space_message(run_dir, need_bytes, latest_name(run_dir))) from None
        raise
    error: Optional[BaseException] = None
    records: dict[str, dict] = {}
    try:
        torch.save({"rng": rank_state["rng"], "loader": rank_state.get("loader")}, path / f"rank_{rank:05d}.pt")
        if rank == 0:
            torch.save(trainer_state, path / TRAINER_STATE)
            (path / CONFIG_FILE).write_text(config_yaml)
            if ema_state is not None:
                save_file(ema_state, str(path / EMA_FILE))
        records = {n: {"bytes": (path / n).stat().st_size, "sha256": sha256_file(path / n)}
                   for n in _owned_files(path, rank)}
    except Exception as e:
        error = e
    # every rank's files exist (or some rank failed) before the checkpoint is declared complete
    status = D.all_gather_object((error is not None, error is not None and out_of_space(error, root), records))
    if os.environ.get(CRASH_ENV) == str(step):
        os.kill(os.getpid(), signal.SIGKILL)  # every rank dies here, as in a node loss mid-save
    if any(failed for failed, _, _ in status):
        if rank == 0:
            shutil.rmtree(path, ignore_errors=True)
        if any(full for _, full, _ in status):
            raise NoSpaceError(no_space_message(run_dir, need_bytes, latest_name(run_dir))) from None
        if error is not None:
            raise error
        raise CheckpointError(f"checkpoint {path} not written: another rank failed to write its files (see its error)")
    if rank == 0:
        files = {n: r for _, _, recs in status for n, r in recs.items()}
        # "model" is the task's model config: readers compare it to refuse another model size.
        info = {"step": step, "samples_seen": trainer_state["samples_seen"], "world_size": world_size,
                "zero_stage": trainer_state["zero_stage"], "model": trainer_state["model_config"],
                "files": files, "bytes": sum(r["bytes"] for r in files.values())}
        _write_atomic(path / COMPLETE, json.dumps(info, indent=1, sort_keys=True))
        _write_atomic(root / LATEST, name + "\n")
        prune(run_dir, keep_last, milestone_every)
    D.all_gather_object(None)
    return path


def prune(run_dir: Path, keep_last: int, milestone_every: int) -> list[Path]:
    """Delete complete checkpoints beyond the last `keep_last` (milestones stay) and stale incomplete ones."""
    done = list_complete(run_dir)
    keep = {s for s, _ in done[-keep_last:]}
    if milestone_every > 0:
        keep |= {s for s, _ in done if s % milestone_every == 0}
    removed = [p for s, p in done if s not in keep]
    newest = done[-1][0] if done else -1
    for d in (Path(run_dir) / CKPT_DIR).iterdir():
        m = _STEP_RE.match(d.name)
        # An incomplete checkpoint older than the newest complete one can never be finished.
        if m and d.is_dir() and not (d / COMPLETE).exists() and int(m.group(1)) < newest:
            removed.append(d)
    for p in removed:
        shutil.rmtree(p, ignore_errors=True)
    return removed


def load_trainer_state(ckpt_dir: Path) -> dict:
    return torch_load(ckpt_dir / TRAINER_STATE)


def load_rank_state(ckpt_dir: Path, rank: int) -> dict:
    return torch_load(ckpt_dir / f"rank_{rank:05d}.pt")
