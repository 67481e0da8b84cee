"""Run `vqd-eval` as 2 gloo ranks with torchrun's variables, started directly (no launcher process)."""
import os
import socket
import subprocess
import sys


def run_eval_ranks(args: list[str], world: int = 2, timeout: int = 300) -> list[tuple[str, str]]:
    """(stdout, stderr) of each rank of `python -m vqd_scale.cli.eval ARGS`; asserts every rank exits 0."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    base = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "PYTHONWARNINGS": "ignore",
            "WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    procs = [subprocess.Popen([sys.executable, "-m", "vqd_scale.cli.eval", *args],
                              env={**base, "RANK": str(r), "LOCAL_RANK": str(r)}, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r in range(world)]
    try:
        outs = [p.communicate(timeout=timeout) for p in procs]
    finally:  # a failed rank leaves the others waiting in a collective: never leak them
        for p in procs:
            p.kill() if p.poll() is None else None
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    return outs
