"""Disk space for checkpoints: how much one needs, whether the run directory's filesystem has it, and
recognising a write that ran out of it (torch.save reports a full disk only as a zip-writer error)."""
from __future__ import annotations

import errno
import shutil
from pathlib import Path
from typing import Optional

# Test hook: skip the free-space check before each save, so a save really runs into a full disk.
SKIP_SPACE_CHECK_ENV = "VQD_TEST_SKIP_SPACE_CHECK"


def estimate_bytes(num_params: int, zero_stage: int, precision: str) -> int:
    """A first checkpoint's size before one exists: fp32 master + two Adam moments (12 B), the fp32 EMA
    (4 B) and, below ZeRO-3, the full module in its training precision; with a margin."""
    per_param = 16 + ((2 if precision == "bf16" else 4) if zero_stage < 3 else 0)
    return int(num_params * per_param * 1.25) + (1 << 20)


def space_problem(run_dir: Path, need: int, latest: Optional[str]) -> Optional[str]:
    """A one-line refusal when the filesystem of `run_dir` has less than `need` bytes free, else None."""
    where = Path(run_dir)
    while not where.exists() and where != where.parent:
        where = where.parent
    free = shutil.disk_usage(where).free
    return None if free >= need else no_space_message(run_dir, need, latest, free)


def no_space_message(run_dir: Path, need: int, latest: Optional[str], free: Optional[int] = None) -> str:
    """What to tell the user (one line): where, how much is needed (and free), what was kept, what to do."""
    have = "" if free is None else f", {free / 2**20:.1f} MiB free"
    kept = f"; the previous checkpoint ({latest}) and `latest` are intact" if latest else ""
    return (f"no disk space for a checkpoint in run directory {run_dir}: a checkpoint needs about "
            f"{need / 2**20:.1f} MiB{have}{kept}; free space there (or lower checkpoint.keep_last), then "
            "resume with --resume auto")


def out_of_space(e: BaseException, where: Path) -> bool:
    """Whether a failed write ran out of disk space or quota. torch.save reports a full disk only as a
    zip-writer position error, so an almost full filesystem counts too."""
    text = str(e)
    if getattr(e, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or "os error 28" in text or "os error 122" in text:
        return True
    try:
        return shutil.disk_usage(where).free < (1 << 20)
    except OSError:
        return False
