"""Rank-parallel evaluation: wall time of `vqd-eval --step N --force` with 1 rank (the baseline,
measured in the same run) and with R ranks, on one run directory; prints the speed-up and checks
that both give the same metrics.

    python bench/eval_ranks.py RUN_DIR STEP [--ranks 2] [eval.num_samples=256 ...]

Each run gets a copy of RUN_DIR (checkpoint STEP only), so the real eval/ results stay untouched.
The time includes process start and model loading (what a scheduled eval job pays).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(run_dir: Path, step: int, ranks: int, overrides: list[str], work: Path) -> tuple[float, dict]:
    """Copy the run (one checkpoint), evaluate it with `ranks` processes; (seconds, metrics)."""
    dst = work / f"ranks{ranks}"
    shutil.copytree(run_dir, dst, ignore=shutil.ignore_patterns("eval", "wandb", "step_*"))
    name = f"step_{step:08d}"
    shutil.copytree(run_dir / "checkpoints" / name, dst / "checkpoints" / name)
    threads = max(1, (os.cpu_count() or 1) // ranks)  # the same cores in total for every variant
    base = {**os.environ, "OMP_NUM_THREADS": str(threads), "WANDB_MODE": "disabled", "WORLD_SIZE": str(ranks),
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}
    cmd = [sys.executable, "-m", "vqd_scale.cli.eval", str(dst), "--step", str(step), *overrides]
    t0 = time.perf_counter()
    procs = [subprocess.Popen(cmd, env={**base, "RANK": str(r), "LOCAL_RANK": str(r)} if ranks > 1 else
                              {k: v for k, v in base.items() if k not in ("WORLD_SIZE",)},
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for r in range(ranks)]
    errs = [p.communicate()[1] for p in procs]
    seconds = time.perf_counter() - t0
    for p, err in zip(procs, errs):
        if p.returncode != 0:
            sys.exit(f"vqd-eval failed with {ranks} rank(s):\n{err[-2000:]}")
    return seconds, json.loads((dst / "eval" / f"{step}.json").read_text())["metrics"]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir")
    ap.add_argument("step", type=int)
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_intermixed_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        t1, m1 = run(Path(a.run_dir), a.step, 1, a.overrides, Path(tmp))
        tr, mr = run(Path(a.run_dir), a.step, a.ranks, a.overrides, Path(tmp))
    same = m1.keys() == mr.keys() and all(abs(m1[k] - mr[k]) <= 1e-6 * max(1.0, abs(m1[k])) for k in m1)
    print(f"1 rank: {t1:.1f}s   {a.ranks} ranks: {tr:.1f}s   speed-up ×{t1 / tr:.2f}   "
          f"same metrics: {same}   ({os.cpu_count()} CPUs, threads split evenly)")


if __name__ == "__main__":
    main()
