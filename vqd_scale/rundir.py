"""The run directory as its readers see it: file names, complete checkpoints, their weights, metrics.

Training writes a run directory (`train/checkpoint.py`, `train/loop.py`); evaluation, sampling, export
and resume read it through this module only, so no reader depends on training internals. A checkpoint
without `complete.json` is incomplete and invisible here; files are checked against the sizes and
SHA-256 sums `complete.json` lists before they are loaded, and a damaged one is named in the error.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors.torch import load_file

from vqd_scale.errors import UserError

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
LOCK_FILE = "train.lock"  # held by the one training job writing the run directory (train/run_lock.py)
EVAL_DIR = "eval"  # eval/<step>.json results, grids, curves, claims (written by vqd-eval, never by training)
DAMAGED_SUFFIX = ".damaged"  # a checkpoint whose files fail their sizes/hashes, set aside on resume
_STEP_RE = re.compile(r"^step_(\d{8,})$")




class CheckpointError(UserError):
    """A checkpoint that cannot be used as it is; the message names the file and what is wrong."""


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
    """The `complete.json` of a checkpoint; refuses an incomplete one and names a damaged one."""
    p = Path(ckpt_dir) / COMPLETE
    if not p.is_file():
        raise FileNotFoundError(f"{ckpt_dir} has no {COMPLETE}: it is incomplete (a save was interrupted); "
                                "use another checkpoint or --resume auto")
    try:
        info = json.loads(p.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{p} is damaged (not JSON: {e}); use another checkpoint or --resume auto") from None
    if not isinstance(info, dict) or not isinstance(info.get("files", {}), dict):
        raise CheckpointError(f"{p} is damaged (not a checkpoint record); use another checkpoint or --resume auto")
    return info


def sha256_file(path: str | os.PathLike, chunk: int = 8 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def file_problems(ckpt_dir: str | os.PathLike, info: dict, hash_names: Optional[list[str]] = None) -> list[str]:
    """What is wrong with the files `complete.json` lists: missing or of another size (all of them), another
    SHA-256 (those in `hash_names`; None = all). Empty for a checkpoint written before files were listed."""
    ckpt_dir, out = Path(ckpt_dir), []
    files = info.get("files", {})
    for name in sorted(files):
        want = files[name]
        path = ckpt_dir / name
        if not path.is_file():
            out.append(f"{path} is missing")
        elif path.stat().st_size != want["bytes"]:
            out.append(f"{path} has {path.stat().st_size} bytes, {want['bytes']} were written (truncated or replaced)")
        elif (hash_names is None or name in hash_names) and sha256_file(path) != want["sha256"]:
            out.append(f"{path} does not match its SHA-256 in {COMPLETE} (damaged bytes)")
    return out


def verify(ckpt_dir: str | os.PathLike, names: Optional[list[str]] = None) -> dict:
    """complete.json of a checkpoint whose files (or just `names`) are intact; raises CheckpointError naming them."""
    info = read_complete(ckpt_dir)
    listed = info.get("files", {})
    bad = file_problems(ckpt_dir, {"files": {n: listed[n] for n in listed if names is None or n in names}})
    if bad:
        raise CheckpointError(f"checkpoint {ckpt_dir} is damaged: {'; '.join(bad)}; use another checkpoint")
    return info


def torch_load(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing: the checkpoint is damaged; use another checkpoint") from None
    except Exception as e:  # torch raises RuntimeError / UnpicklingError / EOFError / zipfile errors for bad bytes
        raise CheckpointError(f"{path} is unreadable ({type(e).__name__}: {str(e)[:200]}): the checkpoint is "
                              "damaged; use another checkpoint") from None


def load_ema(ckpt_dir: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The EMA weights of a checkpoint (checked against complete.json), named when damaged."""
    path = Path(ckpt_dir) / EMA_FILE
    verify(ckpt_dir, [EMA_FILE])
    try:
        return load_file(str(path))
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing: the checkpoint is damaged; use another checkpoint") from None
    except Exception as e:  # safetensors raises SafetensorError for truncated or garbled files
        raise CheckpointError(f"{path} is unreadable ({type(e).__name__}: {e}): the checkpoint is damaged; "
                              "use another checkpoint") from None


def load_weights(ckpt_dir: str | os.PathLike, which: str = "ema") -> dict[str, torch.Tensor]:
    """Consolidated fp32 weights of the trainable module: `ema` (EMA) or `model` (raw, from ZeRO shards)."""
    ckpt_dir = Path(ckpt_dir)
    if which == "ema":
        return load_ema(ckpt_dir)
    if which != "model":
        raise UserError(f"which={which!r}; use 'ema' or 'model'")
    info = verify(ckpt_dir)
    if info.get("zero_stage", 0) == 0:
        # Stage 0 keeps a full copy of the module in the model-states file.
        sd = torch_load(ckpt_dir / "mp_rank_00_model_states.pt")["module"]
        return {k: v.float() for k, v in sd.items()}
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    sd = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir.parent), tag=ckpt_dir.name)
    return {k: v.float().contiguous() for k, v in sd.items()}


def latest_name(run_dir: str | os.PathLike) -> Optional[str]:
    """The checkpoint `latest` names (None before the first)."""
    p = Path(run_dir) / CKPT_DIR / LATEST
    return p.read_text().strip() if p.is_file() else None


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
        raise UserError(f"checkpoint {where} was trained with a different model ({shown}); use a run "
                         "directory/checkpoint of this model size, or set the model section to match")


def read_metrics(run_dir: str | os.PathLike) -> dict[int, dict]:
    """metrics.jsonl → {step: record}; a step logged twice (replayed after resume) keeps its last record."""
    out: dict[int, dict] = {}
    with open(Path(run_dir) / METRICS_FILE) as f:
        for line in f:
            if line.strip():
                rec = json.loads(line)
                out[rec["step"]] = rec
    return out


class _DropMessage(logging.Filter):
    """Drops log records whose message contains `needle`."""

    def __init__(self, needle: str):
        super().__init__()
        self.needle = needle

    def filter(self, record: logging.LogRecord) -> bool:
        return self.needle not in record.getMessage()


def load_text_tower(text_cfg, run_dir: str | os.PathLike, device: str | torch.device = "cpu"):
    """A run's frozen text tower: `text.pretrained` weights, else the random-init tower training saved.

    Without `text.pretrained`, training draws the tower at random and writes it next to the run's
    config.yaml; a freshly drawn one would condition the model on different features, so it is refused.
    """
    from vqd_scale.errors import MissingInput
    from vqd_scale.models.text import FrozenCLIPTextEncoder

    if text_cfg.pretrained:
        return FrozenCLIPTextEncoder(text_cfg).to(device).eval()
    path = Path(run_dir) / TEXT_FILE
    if not path.is_file():
        raise MissingInput(f"text.pretrained is unset and {path} is missing: the model was trained with a "
                           f"random-init text tower saved there; copy {TEXT_FILE} from the run directory "
                           "next to the config, or set text.pretrained")
    quiet = _DropMessage("No pretrained weights loaded")  # open_clip's "initialized randomly": not so here
    logging.getLogger().addFilter(quiet)
    try:
        text = FrozenCLIPTextEncoder(text_cfg)
    finally:
        logging.getLogger().removeFilter(quiet)
    text.load_state_dict(load_file(str(path)))
    return text.to(device).eval()
