"""Which checkpoints still need evaluating, claims so concurrent evaluators never duplicate work,
and the polling loop of `vqd-eval --watch`.

A checkpoint is *evaluated* when `RUN_DIR/eval/<step>.json` exists (written atomically last).
Before evaluating, an evaluator *claims* the step by creating `eval/<step>.lock` atomically (a hard
link, which fails if the name exists), so two watchers on a shared file system never evaluate the
same step; a claim left by a dead evaluator (same host and its pid is gone, an earlier attempt of
this requeued SLURM job, or older than `stale_seconds`) is retaken, which makes a restart
idempotent. A watcher started before its training job waits for the run to appear
(`wait_for_run`). Pure file-system logic: the evaluation is a callback.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any, Callable, Optional

import yaml

from vqd_scale.rundir import COMPLETE, EVAL_DIR, list_complete  # noqa: F401  (EVAL_DIR: eval's own dir)
from vqd_scale.rundir import DONE_FILE as DONE_MARKER  # written by training when it finished for good

log = logging.getLogger(__name__)



def result_path(run_dir: str | os.PathLike, step: int) -> Path:
    """`RUN_DIR/eval/<step>.json` (docs/architecture.md, Run directory)."""
    return Path(run_dir) / EVAL_DIR / f"{step}.json"


def lock_path(run_dir: str | os.PathLike, step: int) -> Path:
    return Path(run_dir) / EVAL_DIR / f"{step}.lock"


def pending(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints without a result, ascending; incomplete ones are never listed."""
    return [(s, p) for s, p in list_complete(run_dir) if not result_path(run_dir, s).exists()]


def _owner() -> dict[str, Any]:
    return {"host": socket.gethostname(), "pid": os.getpid(), "slurm_job": os.environ.get("SLURM_JOB_ID"),
            "slurm_restart": os.environ.get("SLURM_RESTART_COUNT", "0"), "time": time.time()}


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _is_stale(owner: dict, stale_seconds: float) -> bool:
    """A claim whose evaluator cannot still be running."""
    me = _owner()
    if (owner.get("slurm_job") and owner.get("slurm_job") == me["slurm_job"]
            and owner.get("slurm_restart", "0") != me["slurm_restart"]):
        return True  # this SLURM job was requeued (another restart count): the earlier attempt is gone
    if owner.get("host") == me["host"] and not _pid_alive(int(owner.get("pid", -1))):
        return True
    return time.time() - float(owner.get("time", 0)) > stale_seconds


def _create_claim(lock: Path) -> bool:
    """Create `lock` holding our owner record, all at once; False if it already exists.

    The record is written to a private file first and hard-linked into place (link fails if the name
    exists, like O_EXCL), so a reader never sees a claim that is still empty: an empty claim would read
    as an unknown owner and be retaken as stale while its evaluator is running.
    """
    tmp = lock.with_name(f"{lock.name}.{socket.gethostname()}.{os.getpid()}.{threading.get_ident()}.tmp")
    tmp.write_text(json.dumps(_owner()))
    try:
        os.link(tmp, lock)
        return True
    except FileExistsError:
        return False
    finally:
        tmp.unlink(missing_ok=True)


def try_claim(run_dir: str | os.PathLike, step: int, stale_seconds: float) -> bool:
    """Atomically claim `step` for this process; False if it is done or claimed by a live evaluator."""
    lock = lock_path(run_dir, step)
    lock.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(2):  # second round only after removing a stale claim
        if result_path(run_dir, step).exists():
            return False
        if not _create_claim(lock):
            try:
                owner = json.loads(lock.read_text())
            except FileNotFoundError:
                continue  # released between our attempt and the read: try again
            except (OSError, ValueError):
                owner = {"time": lock.stat().st_mtime if lock.exists() else 0}  # garbage: judge by its age
            if not _is_stale(owner, stale_seconds):
                return False
            log.warning("retaking stale eval claim %s (owner %s)", lock, owner)
            lock.unlink(missing_ok=True)
            continue
        if result_path(run_dir, step).exists():  # finished between our check and the claim
            lock.unlink(missing_ok=True)
            return False
        return True
    return False


def release(run_dir: str | os.PathLike, step: int) -> None:
    lock_path(run_dir, step).unlink(missing_ok=True)


def claim_next(run_dir: str | os.PathLike, stale_seconds: float,
               only_step: Optional[int] = None) -> Optional[tuple[int, Path]]:
    """Claim the oldest pending complete checkpoint (or exactly `only_step`); None if there is none."""
    for step, path in pending(run_dir):
        if only_step is not None and step != only_step:
            continue
        if try_claim(run_dir, step, stale_seconds):
            return step, path
    return None


def wandb_run(run_dir: str | os.PathLike) -> tuple[str, str]:
    """(id, group) of this evaluator's wandb run. Evaluators of one run directory (two watchers, a
    watcher and an afterok job) must not share an id: each writes its own offline run, and syncing
    two into one id drops the second's history. So one run per evaluator job, grouped per run
    directory; a requeued SLURM job keeps its job id and continues its own run."""
    group = "vqd-" + hashlib.sha1(str(Path(run_dir).resolve()).encode()).hexdigest()[:12] + "-eval"
    job = os.environ.get("SLURM_JOB_ID")
    who = job if job and job.isdigit() else hashlib.sha1(f"{socket.gethostname()}:{os.getpid()}".encode()).hexdigest()[:8]
    return f"{group}-{who}", group


def run_appeared(run_dir: str | os.PathLike) -> bool:
    """The training run has started and written its config in full: config.yaml (rank 0 writes it
    before the first step) and at least one complete checkpoint."""
    return (Path(run_dir) / "config.yaml").is_file() and bool(list_complete(run_dir))


def wait_for_run(run_dir: str | os.PathLike, timeout: float, poll_seconds: float,
                 sleep: Callable[[float], None] = time.sleep, clock: Callable[[], float] = time.monotonic) -> bool:
    """Poll until `run_appeared` (True) or `timeout` seconds pass (False): a watcher's job may start
    before the training job it watches has created anything."""
    end = clock() + timeout
    while not run_appeared(run_dir):
        left = end - clock()
        if left <= 0:
            return False
        sleep(min(poll_seconds, left))
    return True


def training_finished(run_dir: str | os.PathLike) -> bool:
    """Training will write no more checkpoints: a DONE marker, or the newest complete checkpoint
    reached `max_samples` of the run's config (the loop always saves at the end)."""
    run_dir = Path(run_dir)
    if (run_dir / DONE_MARKER).exists():
        return True
    done = list_complete(run_dir)
    cfg_file = run_dir / "config.yaml"
    if not done or not cfg_file.is_file():
        return False
    try:
        max_samples = int((yaml.safe_load(cfg_file.read_text()) or {}).get("max_samples", 0))
        seen = int(json.loads((done[-1][1] / COMPLETE).read_text()).get("samples_seen", -1))
    except (OSError, ValueError, TypeError, AttributeError):
        return False
    return max_samples > 0 and seen >= max_samples


def run(run_dir: str | os.PathLike, evaluate: Callable[[int, Path], Any], *, watch: bool,
        poll_seconds: float, idle_timeout: float, stale_seconds: float, only_step: Optional[int] = None,
        decide: Callable[[Callable[[], Any]], Any] = lambda f: f(), is_main: bool = True,
        sleep: Callable[[float], None] = time.sleep, clock: Callable[[], float] = time.monotonic) -> list[int]:
    """Evaluate pending checkpoints once each; with `watch`, keep polling until training finished
    and nothing is pending, or `idle_timeout` passes without work. Returns the steps evaluated here.

    `decide(f)` runs the file-system decision `f` on one rank and hands its result to every rank
    (torch.distributed broadcast); with one process it just calls `f`. `is_main` marks that rank.
    """
    done: list[int] = []
    last_work = clock()

    def next_action():
        item = claim_next(run_dir, stale_seconds, only_step)
        if item is not None:
            return ("eval", item[0], str(item[1]))
        if only_step is not None:
            over = result_path(run_dir, only_step).exists()  # evaluated, here or by another evaluator
        else:
            over = training_finished(run_dir) and not pending(run_dir)
        if not watch or over or clock() - last_work > idle_timeout:
            return ("stop",)
        return ("wait",)

    while True:
        action = decide(next_action)
        if action[0] == "stop":
            return done
        if action[0] == "wait":
            sleep(poll_seconds)
            continue
        step, path = action[1], Path(action[2])
        try:
            evaluate(step, path)
        except Exception:
            if (path / COMPLETE).is_file():
                raise
            # Pruned by training (checkpoint.keep_last) before or while we read it: nothing left to
            # evaluate, and the watcher must go on to the newer checkpoints rather than die.
            log.warning("checkpoint %s was deleted while being evaluated (checkpoint.keep_last); skipped", path)
            continue
        finally:
            # Only the claimer removes the lock; on failure the step stays pending for the next run.
            if is_main:
                release(run_dir, step)
        done.append(step)
        last_work = clock()
