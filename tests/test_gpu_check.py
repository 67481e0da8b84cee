"""bench/gpu_check.py (the one-GPU readiness check) runs every section on CPU at a tiny size."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_runs_on_cpu_at_tiny_size():
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT"):
        env.pop(k, None)
    r = subprocess.run([sys.executable, "bench/gpu_check.py", "--device", "cpu", "--tiny"], capture_output=True,
                       text=True, cwd=REPO, env=env, timeout=900)
    assert r.returncode == 0, r.stderr[-4000:]
    out = r.stdout
    assert re.search(r"gpu_check on CPU .*; commit \w+", out)
    assert "flash: yes" in out and "flash kernel forced: runs" in out  # the CPU flash kernel, as on GPU
    for ckpt in ("off", "on "):
        m = re.search(rf"activation checkpointing {ckpt}: ([\d.]+) samples/s, .*peak memory ([\d.]+) GiB vs planner "
                      rf"([\d.]+) GiB \(([\d.]+)×\) \[\d+M params, bf16\]", out)
        assert m and float(m.group(1)) > 0, out
        assert abs(float(m.group(4)) - 1) < 0.10, out  # the planner's memory model holds at this size too
    assert re.search(r"ours, 8 steps \(equal steps\): +[\d.]+ img/s +→ ratio [\d.]+×", out)
    assert re.search(r"speed ratio ours/diffusers = [\d.]+x", out) and "bf16=True" in out
