"""Client-side helpers for tests/slurm: submit with sbatch, poll scontrol (never `sbatch --wait`), read logs."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tools"))
from local_slurm import LocalSlurm  # noqa: E402

TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
            "PREEMPTED"}


class Cluster:
    """Client side of the local cluster: submit with sbatch, poll with scontrol, read logs."""

    def __init__(self, slurm: LocalSlurm, work: Path):
        self.slurm = slurm
        self.work = work
        self.logs = work / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)

    def env(self, **extra: str) -> dict:
        """Job environment: the cluster's SLURM_CONF, CPU DeepSpeed, this python, quiet wandb."""
        env = self.slurm.env
        # WANDB_MODE wins over the config in vqd-train; wandb's service process dies on Slurm's SIGTERM
        env.update(PYTHON=sys.executable, VQD_ROOT=str(REPO), VQD_DEVICE="cpu", OMP_NUM_THREADS="1",
                   WANDB_MODE="disabled", WANDB_SILENT="true", HF_HUB_OFFLINE="1", DS_ACCELERATOR="cpu",
                   PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        env.setdefault("TORCH_EXTENSIONS_DIR", os.path.expanduser("~/.cache/vqd_scale/torch_extensions"))
        env.update(extra)
        return env

    def run(self, cmd: list[str], env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
        r = subprocess.run(cmd, cwd=REPO, env=env or self.env(), capture_output=True, text=True, timeout=60)
        if check and r.returncode != 0:
            raise AssertionError(f"`{' '.join(cmd)}` failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
        return r

    def sbatch(self, args: list[str], env: dict | None = None) -> str:
        """Submit from the repository root; returns the job id."""
        r = self.run(["sbatch", "--parsable", *args], env=env)
        return r.stdout.strip().split(";")[0]

    def job(self, job_id: str) -> dict:
        """`scontrol show job` as a dict (JobState, Restarts, ExitCode, StdOut, ...)."""
        r = self.run(["scontrol", "show", "job", "-o", job_id], check=False)
        if r.returncode != 0:
            return {}
        return dict(kv.split("=", 1) for kv in r.stdout.split() if "=" in kv)

    def log_tail(self, job_id: str, n: int = 40) -> str:
        path = self.job(job_id).get("StdOut") or ""
        text = Path(path).read_text(errors="replace") if path and Path(path).exists() else f"(no log at {path!r})"
        return f"--- job {job_id} log {path}:\n" + "\n".join(text.splitlines()[-n:])

    def wait_for(self, cond, timeout: float, what: str, job_id: str, poll: float = 0.5):
        """Poll `cond()` until truthy; on timeout cancel the job and fail with its log tail."""
        end = time.time() + timeout
        while time.time() < end:
            got = cond()
            if got:
                return got
            time.sleep(poll)
        info = self.job(job_id)
        self.run(["scancel", job_id], check=False)
        pytest.fail(f"timed out after {timeout:.0f} s waiting for {what} (job {job_id} state "
                    f"{info.get('JobState')}, reason {info.get('Reason')})\n{self.log_tail(job_id)}")

    def wait_done(self, job_id: str, timeout: float) -> dict:
        """Wait until the job reaches a terminal state; returns its scontrol record."""
        return self.wait_for(lambda: (lambda j: j if j.get("JobState") in TERMINAL else None)(self.job(job_id)),
                             timeout, "the job to end", job_id)

    def assert_completed(self, job_id: str, info: dict) -> None:
        assert info.get("JobState") == "COMPLETED" and info.get("ExitCode") == "0:0", \
            f"job {job_id} ended {info.get('JobState')} exit {info.get('ExitCode')}\n{self.log_tail(job_id)}"
