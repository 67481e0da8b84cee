"""Checkpoint layout, atomic completion, retention, resume selection, and the reader API.

RUN_DIR/checkpoints/step_XXXXXXXX/ holds DeepSpeed's ZeRO shards (model + optimizer), our
`trainer_state.pt` (step, samples seen, task state, world size, zero stage), one `rank_XXXXX.pt` per rank
(RNG states, loader state), `config.yaml`, `ema.safetensors` — and `complete.json`, written last
by rank 0 after a barrier. `latest` names the newest complete checkpoint and is replaced atomically
after `complete.json`, so a crash at any point leaves the previous checkpoint loadable and named.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from safetensors.torch import load_file, save_file

# Run-directory layout (docs/architecture.md): the one place these names are defined.
CONFIG_FILE = "config.yaml"  # fully resolved RunConfig, in RUN_DIR and in every checkpoint
METRICS_FILE = "metrics.jsonl"
TEXT_FILE = "text_encoder.safetensors"  # frozen text tower weights when text.pretrained is unset
DONE_FILE = "DONE"  # written when max_samples is reached: eval watchers stop polling
CKPT_DIR = "checkpoints"
COMPLETE = "complete.json"
LATEST = "latest"
EMA_FILE = "ema.safetensors"
TRAINER_STATE = "trainer_state.pt"
_STEP_RE = re.compile(r"^step_(\d{8,})$")
# Test hook: SIGKILL after the shards are written but before complete.json (simulates a kill mid-save).
CRASH_ENV = "VQD_TEST_KILL_BEFORE_COMPLETE"  # value: the step whose save is SIGKILLed


def ckpt_name(step: int) -> str:
    return f"step_{step:08d}"


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())  # the rename must not become visible before the data
    os.replace(tmp, path)


def list_complete(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """(step, path) of every complete checkpoint in a run directory, ascending by step."""
    root = Path(run_dir) / CKPT_DIR
    if not root.is_dir():
        return []
    out = []
    for d in root.iterdir():
        m = _STEP_RE.match(d.name)
        if m and d.is_dir() and (d / COMPLETE).is_file():
            out.append((int(m.group(1)), d))
    return sorted(out)


def read_complete(ckpt_dir: str | os.PathLike) -> dict:
    """The `complete.json` of a checkpoint; refuses an incomplete one."""
    p = Path(ckpt_dir) / COMPLETE
    if not p.is_file():
        raise FileNotFoundError(f"{ckpt_dir} has no {COMPLETE}: it is incomplete (a save was interrupted); "
                                "use another checkpoint or --resume auto")
    return json.loads(p.read_text())


def load_weights(ckpt_dir: str | os.PathLike, which: str = "ema") -> dict[str, torch.Tensor]:
    """Consolidated fp32 weights of the trainable module: `ema` (EMA) or `model` (raw, from ZeRO shards)."""
    ckpt_dir = Path(ckpt_dir)
    info = read_complete(ckpt_dir)
    if which == "ema":
        return load_file(str(ckpt_dir / EMA_FILE))
    if which != "model":
        raise ValueError(f"which={which!r}; use 'ema' or 'model'")
    if info.get("zero_stage", 0) == 0:
        # Stage 0 keeps a full copy of the module in the model-states file.
        sd = torch.load(ckpt_dir / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]
        return {k: v.float() for k, v in sd.items()}
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    sd = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir.parent), tag=ckpt_dir.name)
    return {k: v.float().contiguous() for k, v in sd.items()}


def resolve_resume(run_dir: str | os.PathLike, resume: str) -> Optional[Path]:
    """`none` → None; `auto` → newest complete checkpoint (or None); else that path, which must be complete."""
    if resume == "none":
        return None
    if resume == "auto":
        done = list_complete(run_dir)
        return done[-1][1] if done else None
    p = Path(resume)
    if _STEP_RE.match(p.name) is None and (p / LATEST).is_file():  # a checkpoints/ dir: follow `latest`
        p = p / (p / LATEST).read_text().strip()
    read_complete(p)  # raises with a message when incomplete or missing
    return p


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


def save_checkpoint(run_dir: Path, step: int, engine, rank: int, world_size: int, trainer_state: dict,
                    rank_state: dict, ema_state: Optional[dict[str, torch.Tensor]], config_yaml: str,
                    barrier, keep_last: int, milestone_every: int) -> Path:
    """Write one checkpoint from every rank (collective); returns its directory."""
    root = run_dir / CKPT_DIR
    name = ckpt_name(step)
    path = root / name
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        if path.exists():  # leftovers of an interrupted save of this same step
            shutil.rmtree(path)
    barrier()
    # DeepSpeed writes the ZeRO shards of every rank into root/name (collective).
    engine.save_checkpoint(str(root), tag=name, save_latest=False)
    torch.save({"rng": rank_state["rng"], "loader": rank_state.get("loader")}, path / f"rank_{rank:05d}.pt")
    if rank == 0:
        torch.save(trainer_state, path / TRAINER_STATE)
        (path / CONFIG_FILE).write_text(config_yaml)
        if ema_state is not None:
            save_file(ema_state, str(path / EMA_FILE))
    barrier()  # every rank's files exist before the checkpoint is declared complete
    if os.environ.get(CRASH_ENV) == str(step):
        os.kill(os.getpid(), signal.SIGKILL)  # every rank dies here, as in a node loss mid-save
    if rank == 0:
        # "model" is the task's model config: readers compare it to refuse another model size.
        info = {"step": step, "samples_seen": trainer_state["samples_seen"], "world_size": world_size,
                "zero_stage": trainer_state["zero_stage"], "model": trainer_state["model_config"]}
        _write_atomic(path / COMPLETE, json.dumps(info, indent=1, sort_keys=True))
        _write_atomic(root / LATEST, name + "\n")
        prune(run_dir, keep_last, milestone_every)
    barrier()
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
    return torch.load(ckpt_dir / TRAINER_STATE, map_location="cpu", weights_only=False)


def load_rank_state(ckpt_dir: Path, rank: int) -> dict:
    return torch.load(ckpt_dir / f"rank_{rank:05d}.pt", map_location="cpu", weights_only=False)


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def check_same_model(saved: dict, current: dict, where: str) -> None:
    """Refuse a checkpoint whose model config differs from this run's (e.g. another model size)."""
    saved, current = _flat(saved), _flat(current)
    diff = {k: (saved.get(k), current.get(k)) for k in sorted(set(saved) | set(current))
            if saved.get(k) != current.get(k) and not k.endswith("activation_checkpointing")}
    if diff:
        shown = ", ".join(f"{k}: checkpoint {a!r} vs config {b!r}" for k, (a, b) in list(diff.items())[:4])
        raise ValueError(f"checkpoint {where} was trained with a different model ({shown}); use a run "
                         "directory/checkpoint of this model size, or set the model section to match")
