"""Training metrics: JSONL file, wandb (offline by default), and a rank-0 console line; throughput and MFU.

wandb is optional telemetry and never the reason a run dies: a failure to start, log or finish
(no network, a bad WANDB_MODE, its `wandb-core` service killed by the SIGTERM that SLURM sends to every
process of the job) is warned about once, and the run goes on with metrics.jsonl and the console.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
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
from vqd_scale.train.checkpoint import METRICS_FILE
from vqd_scale.train.signals import StopFlag

# Dense bf16 peak FLOP/s per GPU (vendor datasheets), for the MFU estimate.
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40": 181e12, "A10": 125e12, "V100": 125e12}


def peak_flops(device: torch.device) -> Optional[float]:
    """Datasheet peak of this GPU, or None (CPU or unknown GPU: MFU is not reported)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


def flops_per_sample(num_params: int, layers: int, dim: int, seq_len: int, context_len: int) -> float:
    """nanoGPT/PaLM estimate of training FLOPs per sample: 6·N·S for the weights plus attention scores."""
    # 6 = forward (2) + backward (4) multiply-adds per weight per token; attention adds
    # 12·L·D·S per token for self-attention (QKᵀ and AV over S keys) and 12·L·D·C for cross-attention.
    return 6.0 * num_params * seq_len + 12.0 * layers * dim * seq_len * (seq_len + context_len)


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
                "peak_mem_mb", "mfu")


def read_metrics(run_dir: str | os.PathLike) -> dict[int, dict]:
    """metrics.jsonl → {step: record}; a step logged twice (replayed after resume) keeps its last record."""
    out: dict[int, dict] = {}
    with open(Path(run_dir) / METRICS_FILE) as f:
        for line in f:
            if line.strip():
                rec = json.loads(line)
                out[rec["step"]] = rec
    return out
