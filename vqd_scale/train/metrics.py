"""Training metrics: JSONL file, wandb (offline by default), and a rank-0 console line; throughput, MFU/HFU peaks.

wandb is optional telemetry and never the reason a run dies: a failure to start, log or finish
(no network, a bad WANDB_MODE, its `wandb-core` service killed by the SIGTERM that SLURM sends to every
process of the job) is warned about once, and the run goes on with metrics.jsonl and the console.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import resource
import signal
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch

from vqd_scale.config import LoggingConfig
from vqd_scale.rundir import METRICS_FILE, read_metrics  # noqa: F401  (read_metrics: the reader's API)
from vqd_scale.train.signals import StopFlag

# Dense (no sparsity) datasheet peaks per GPU in FLOP/s: (16-bit tensor-core bf16/fp16, fp32 without TF32).
# Matched in order with word boundaries against torch.cuda.get_device_name: "L40S" must not take the L40 row,
# nor "H100 PCIe" the SXM row ("NVIDIA H100 80GB HBM3"), nor "GH200"/"A10G" the H200/A10 rows.
PEAK_FLOPS: tuple[tuple[str, Optional[float], Optional[float], float], ...] = (
    # pattern, bf16, fp16, fp32
    (r"\bH100\b.*\bPCIe\b", 756e12, 756e12, 51.2e12),
    (r"\bH100\b.*\bNVL\b", 835e12, 835e12, 60e12),
    (r"\bH100\b", 989e12, 989e12, 66.9e12),  # SXM5
    (r"\bH200\b.*\bNVL\b", 835e12, 835e12, 60e12),
    (r"\bH200\b", 989e12, 989e12, 66.9e12),  # SXM
    (r"\bGH200\b", 989e12, 989e12, 66.9e12),
    (r"\bA100\b", 312e12, 312e12, 19.5e12),  # SXM4 and PCIe alike
    (r"\bL40S\b", 362e12, 362e12, 91.6e12),
    (r"\bL40\b", 181e12, 181e12, 90.5e12),
    (r"\bL4\b", 121e12, 121e12, 30.3e12),
    (r"\bA40\b", 150e12, 150e12, 37.4e12),
    (r"\bA10\b", 125e12, 125e12, 31.2e12),
    (r"\bV100\b.*\bPCIe\b", None, 112e12, 14e12),  # no bf16 units
    (r"\bV100\b", None, 125e12, 15.7e12),  # SXM2
    (r"\bT4\b", None, 65e12, 8.1e12),
)


def peak_flops_for(name: str, precision: str) -> Optional[float]:
    """Datasheet peak of a GPU model name at `precision` (bf16 | fp16 | fp32), or None if unknown."""
    col = {"bf16": 1, "fp16": 2, "fp32": 3}[precision]
    row = next((r for r in PEAK_FLOPS if re.search(r[0], name, re.IGNORECASE)), None)
    return None if row is None else row[col]


def peak_flops(device: torch.device, precision: str) -> Optional[float]:
    """Datasheet peak of this GPU at `precision`, or None (CPU or unknown GPU: MFU is not reported)."""
    if device.type != "cuda":
        return None
    return peak_flops_for(torch.cuda.get_device_name(device), precision)


def peak_memory_mb(device: torch.device) -> float:
    """Peak allocated GPU memory, or the process's peak RSS on CPU, in MiB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return kib / 1024


class MetricsLogger:
    """Rank 0 writes metrics.jsonl, wandb and the console line; other ranks do nothing."""

    def __init__(self, cfg: LoggingConfig, run_dir: Path, is_main: bool, config_dict: dict, resumed_step: int):
        self.cfg = cfg
        self.is_main = is_main
        self.file = None
        self.wandb = None
        self._wandb_started = self._warned = False
        if not is_main:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        self.file = open(run_dir / METRICS_FILE, "a", buffering=1)  # line-buffered: survives a kill
        mode = os.environ.get("WANDB_MODE") or cfg.wandb_mode  # the environment wins (documented in config)
        if mode != "disabled":
            # The run id is stable per run directory so a resumed job continues the same wandb run.
            run_id = "vqd-" + hashlib.sha1(str(run_dir.resolve()).encode()).hexdigest()[:12]
            self._wandb_started = True
            with _held_signals(redeliver=True):  # a preemption signal during a slow init acts after it
                self.wandb = self._guard("start", lambda: _wandb_init(
                    project=cfg.wandb_project, entity=cfg.wandb_entity, mode=mode, dir=str(run_dir),
                    config=config_dict, id=run_id, resume="allow"))
        self._last_print = 0.0
        self.resumed_step = resumed_step

    def _guard(self, what: str, fn: Callable):
        """Run a wandb call; on any error warn once, drop wandb, and return None."""
        try:
            return fn()
        except Exception as e:  # wandb raises many types (ConnectionResetError, UsageError, CommError, ...)
            self.wandb = None
            if self._warned:
                return None
            self._warned = True
            warnings.warn(f"wandb failed to {what} ({type(e).__name__}: {e}); continuing WITHOUT wandb — metrics "
                          f"still go to {METRICS_FILE} and the console. WANDB_MODE=offline or disabled (or "
                          "logging.wandb_mode when WANDB_MODE is unset) avoids it.", RuntimeWarning, stacklevel=3)
            return None

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.is_main:
            return
        record = {"step": step, "time": time.time(), **metrics}
        self.file.write(json.dumps(record) + "\n")
        if self.wandb is not None:
            run = self.wandb
            self._guard("log", lambda: run.log(metrics, step=step))
        line = " ".join(f"{k}={v:.4g}" for k, v in metrics.items() if k in CONSOLE_KEYS)
        print(f"[step {step}] {line}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None
        if self.wandb is not None:
            run = self.wandb
            # The run has already checkpointed: a signal now must not kill the process (and lose its exit
            # code) while wandb flushes; it is reported instead.
            with _held_signals(redeliver=False):
                self._guard("finish", run.finish)
            self.wandb = None
        if self._wandb_started:
            self._wandb_started = False
            # Shut its service down here, where a failure is one warning: wandb's own atexit hook would do
            # it at exit and print a long traceback when the service is gone (SLURM's SIGTERM reaches it).
            with _held_signals(redeliver=False):
                self._guard("shut down", _wandb_teardown)


def _wandb_teardown() -> None:
    import wandb
    wandb.teardown()


def _wandb_init(**kwargs):
    import wandb
    os.environ.setdefault("WANDB_SILENT", "true")
    return wandb.init(**kwargs)


@contextlib.contextmanager
def _held_signals(redeliver: bool) -> Iterator[None]:
    """Hold preemption signals during a wandb call; afterwards re-raise them to the previous handler or warn."""
    if threading.current_thread() is not threading.main_thread():  # handlers can only be set there
        yield
        return
    flag = StopFlag().install()
    try:
        yield
    finally:
        flag.restore()
        if flag.raised:
            if redeliver:
                signal.raise_signal(flag.signum)
            else:
                warnings.warn(f"signal {flag.signum} arrived while wandb was finishing; ignored (the run had "
                              "already checkpointed and is exiting)", RuntimeWarning, stacklevel=3)


CONSOLE_KEYS = ("loss", "vlb", "aux", "lr", "grad_norm", "clip_frac", "samples_per_s", "tokens_per_s", "data_wait",
                "peak_mem_mb", "mfu", "hfu")
