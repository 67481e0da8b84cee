"""Callables that submitit runs on cluster nodes: training, one extraction shard, evaluation.

They live in an importable module because submitit pickles them by reference. Each one runs the
real CLI (`python -m vqd_scale.cli.<x>`) as a child process, so the CLI's own signal handling,
exit codes and logging are exactly what `slurm/*.sh` get.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from typing import Optional, Sequence

import submitit

from vqd_scale.launch import TORCH_EXTENSIONS_DIR
from vqd_scale.launch.timeline import record
from vqd_scale.train.signals import EXIT_PREEMPTED


def _distributed_env() -> dict:
    """Child environment with rank/world/rendezvous set for the launcher we run under."""
    env = dict(os.environ)
    job_env = submitit.JobEnvironment()
    if job_env.cluster != "slurm":
        # the local executor sets only SUBMITIT_LOCAL_*: export torchrun-style variables for vqd-train
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
        env = dict(os.environ)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TORCH_EXTENSIONS_DIR", os.path.expanduser(TORCH_EXTENSIONS_DIR))  # as slurm/common.sh
    return env


def _wait_exit(proc: subprocess.Popen, timeout: float) -> bool:
    """Wait for `proc` to end without Popen's wait lock: submitit calls checkpoint() from a signal
    handler that interrupted `proc.wait()` in this same thread, which still holds that lock."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            pid, status = os.waitpid(proc.pid, os.WNOHANG)
        except ChildProcessError:  # already reaped
            return True
        if pid:
            proc.returncode = os.waitstatus_to_exitcode(status)
            return True
        time.sleep(0.2)
    return False


def _run(cmd: list[str], on_proc=None) -> int:
    """Run `cmd`, exposing the Popen to `on_proc` (so a signal handler can reach it); return its status."""
    proc = subprocess.Popen(cmd, env=_distributed_env())
    if on_proc is not None:
        on_proc(proc)
    return proc.wait()


class TrainJob(submitit.helpers.Checkpointable):
    """One task of a training job: `vqd-train CONFIG OVERRIDES --resume auto` as a child process.

    On pre-emption / time-out submitit calls `checkpoint()` in global rank 0: it asks the trainer
    to save (SIGUSR2; every task's trainer gets the Slurm signal too), waits for it to exit, and
    returns a fresh TrainJob that submitit requeues; the requeued job resumes from `latest`.
    With `run_dir`, global rank 0 records each start and requeue in RUN_DIR/slurm_jobs.jsonl
    (`python -m vqd_scale.launch.timeline RUN_DIR`), as slurm/*.sh do.
    """

    def __init__(self, config: str, overrides: Sequence[str] = (), python: str = sys.executable,
                 save_timeout_s: float = 600.0, run_dir: Optional[str] = None):
        self.config = config
        self.overrides = list(overrides)
        self.python = python
        self.save_timeout_s = save_timeout_s
        self.run_dir = run_dir
        self._proc: Optional[subprocess.Popen] = None

    def command(self) -> list[str]:
        """The exact command line each task runs."""
        return [self.python, "-m", "vqd_scale.cli.train", self.config, *self.overrides, "--resume", "auto"]

    def _record(self, event: str, **extra) -> None:
        """One line in RUN_DIR/slurm_jobs.jsonl, written by global rank 0 only."""
        if self.run_dir is None:
            return
        job_env = submitit.JobEnvironment()
        if job_env.global_rank == 0:
            if event == "start":
                extra["tasks_per_node"] = job_env.num_tasks // max(1, job_env.num_nodes)
            record(self.run_dir, event, launcher="submitit", **extra)

    def __call__(self) -> int:
        self._record("start")
        rc = _run(self.command(), on_proc=lambda p: setattr(self, "_proc", p))
        if rc == EXIT_PREEMPTED:
            # rank 0's checkpoint() is requeueing the job; the other ranks just wait to be ended
            time.sleep(self.save_timeout_s)
        if rc != 0:
            raise RuntimeError(f"vqd-train exited with status {rc}: {' '.join(self.command())}")
        return rc

    def checkpoint(self, *args, **kwargs) -> submitit.helpers.DelayedSubmission:
        """Make the trainer save (at its next step boundary), then requeue a fresh copy of this job."""
        proc = self._proc
        if proc is not None and proc.returncode is None:
            os.kill(proc.pid, signal.SIGUSR2)  # harmless if it already exited and is not reaped yet
            if not _wait_exit(proc, self.save_timeout_s):
                print(f"vqd-train did not exit {self.save_timeout_s:.0f} s after SIGUSR2; requeuing anyway "
                      "(the run resumes from the newest complete checkpoint)", file=sys.stderr, flush=True)
        self._record("requeue", step_exit=proc.returncode if proc is not None else None)
        fresh = TrainJob(self.config, self.overrides, self.python, self.save_timeout_s, self.run_dir)
        return submitit.helpers.DelayedSubmission(fresh, *args, **kwargs)

    def __getstate__(self) -> dict:
        # a Popen cannot be pickled, and a requeued job must start its own trainer anyway
        return {k: v for k, v in self.__dict__.items() if k != "_proc"} | {"_proc": None}


class ExtractTask:
    """One array task: `vqd-extract --inputs PATTERN ... --task-index I --num-tasks N` (its share of the
    input shards; a rerun skips shards already done)."""

    def __init__(self, inputs: str, args: Sequence[str], num_tasks: int, python: str = sys.executable):
        self.inputs, self.args, self.num_tasks, self.python = inputs, list(args), num_tasks, python

    def command(self, index: int) -> list[str]:
        return [self.python, "-m", "vqd_scale.cli.extract", "--inputs", self.inputs, *self.args,
                "--task-index", str(index), "--num-tasks", str(self.num_tasks)]

    def __call__(self, index: int) -> int:
        rc = _run(self.command(index))
        if rc != 0:
            raise RuntimeError(f"vqd-extract exited with status {rc}: {' '.join(self.command(index))}")
        return index


class EvalJob(submitit.helpers.Checkpointable):
    """`vqd-eval RUN_DIR --once|--watch`; requeued as is when pre-empted (evaluation is idempotent)."""

    def __init__(self, run_dir: str, watch: bool = False, extra: Sequence[str] = (), python: str = sys.executable):
        self.run_dir, self.watch, self.extra, self.python = run_dir, watch, list(extra), python

    def __call__(self) -> str:
        cmd = [self.python, "-m", "vqd_scale.cli.eval", self.run_dir, "--watch" if self.watch else "--once",
               *self.extra]
        rc = _run(cmd)
        if rc != 0:
            raise RuntimeError(f"vqd-eval exited with status {rc}: {' '.join(cmd)}")
        return self.run_dir
