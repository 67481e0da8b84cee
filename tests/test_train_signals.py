"""Preemption signals at the edges of a vqd-train process: during the imports (before the training
loop's handler exists), at the final step, and wandb's service SIGTERMed with the job."""
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from token_shards import make_token_shards

from vqd_scale.train import checkpoint as C
from vqd_scale.train.metrics import read_metrics
from vqd_scale.train.signals import EXIT_PREEMPTED

REPO = Path(__file__).resolve().parents[1]
BATCH = 8


@pytest.fixture(scope="module")
def tokens(tmp_path_factory):
    """One real token shard: synthetic img2dataset tar → k-means tokenizer → vqd-extract (in-process)."""
    return make_token_shards(tmp_path_factory.mktemp("signal_data"), num_shards=1, per_shard=32)


def _torch_loaded(pid: int) -> bool:
    try:
        return "libtorch" in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False


def _train_signalled_during_imports(tokens: Path, run_dir: Path, steps: int) -> subprocess.CompletedProcess:
    """`python -m vqd_scale.cli.train` for `steps` steps, sent SIGUSR2 while it is still importing torch."""
    cmd = [sys.executable, "-m", "vqd_scale.cli.train", str(REPO / "configs" / "tiny.yaml"), f"run_dir={run_dir}",
           f'data.sources=[{{name: synthetic, shards: "{tokens}/00000.tar"}}]', f"data.manifest={tokens}/manifest.json",
           f"data.batch_size={BATCH}", "model.height=4", "model.width=4", f"max_samples={steps * BATCH}",
           "logging.every_steps=1", "checkpoint.every_steps=1000", "logging.wandb_mode=disabled"]
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", WANDB_MODE="disabled",
               PYTHONWARNINGS="ignore::FutureWarning")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS"):
        env.pop(k, None)
    p = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not _torch_loaded(p.pid) and p.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    # torch is being imported: seconds before the training loop installs its handler
    assert p.poll() is None and not (run_dir / "metrics.jsonl").exists()
    p.send_signal(signal.SIGUSR2)
    out, err = p.communicate(timeout=300)
    return subprocess.CompletedProcess(cmd, p.returncode, out, err)


@pytest.mark.slow
def test_signal_during_imports_is_honoured_at_the_first_step(tokens, tmp_path):
    run = tmp_path / "run"
    r = _train_signalled_during_imports(tokens, run, steps=3)
    assert r.returncode == EXIT_PREEMPTED, (r.returncode, r.stderr[-3000:])  # was -12: killed by SIGUSR2
    assert f"preemption (signal {int(signal.SIGUSR2)}): checkpoint written at step 1" in r.stdout
    assert sorted(read_metrics(run)) == [1] and [s for s, _ in C.list_complete(run)] == [1]
    assert not (run / C.DONE_FILE).exists()


@pytest.mark.slow
def test_signal_at_the_final_step_finishes_instead_of_asking_for_requeue(tokens, tmp_path):
    """A one-step run signalled before that step: the signal is seen at the final step, which ends the
    run (exit 0, DONE), rather than exit 42 and a requeue that would find nothing left to do."""
    run = tmp_path / "run"
    r = _train_signalled_during_imports(tokens, run, steps=1)
    assert r.returncode == 0, (r.returncode, r.stdout[-2000:], r.stderr[-3000:])
    assert "preemption" not in r.stdout
    assert (run / C.DONE_FILE).exists() and [s for s, _ in C.list_complete(run)] == [1]


WANDB_SCRIPT = textwrap.dedent('''
    import os, signal, sys, time
    from pathlib import Path
    from vqd_scale.config import LoggingConfig
    from vqd_scale.train.metrics import MetricsLogger

    def children(pid):
        out = []
        for d in Path("/proc").iterdir():
            try:
                stat = (d / "stat").read_text() if d.name.isdigit() else ""
            except OSError:
                continue
            if stat and int(stat[stat.rindex(")") + 2:].split()[1]) == pid:
                out.append(int(d.name))
        return out

    logger = MetricsLogger(LoggingConfig(wandb_mode="offline"), Path(sys.argv[1]), True, {"a": 1}, 0)
    logger.log(1, {"loss": 1.0})
    service = children(os.getpid())
    assert service, "no wandb service process"
    for pid in service:  # what SLURM's SIGTERM to every process of the job does to wandb-core
        os.kill(pid, signal.SIGTERM)
    while any(Path(f"/proc/{p}").exists() and "zombie" not in Path(f"/proc/{p}/status").read_text()
              for p in service):
        time.sleep(0.05)
    logger.log(2, {"loss": 0.5})
    logger.close()
    print("closed", flush=True)
''')


def test_wandb_service_killed_by_sigterm_gives_one_warning_not_a_traceback(tmp_path):
    env = dict(os.environ, WANDB_MODE="offline", WANDB_SILENT="true", WANDB_DIR=str(tmp_path))
    env.pop("WANDB_SERVICE", None)  # left by an earlier in-process wandb test: the script must start its own service
    r = subprocess.run([sys.executable, "-c", WANDB_SCRIPT, str(tmp_path / "run")], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "closed" in r.stdout, r.stderr[-3000:]
    assert "Traceback" not in r.stderr and "Exception ignored" not in r.stderr, r.stderr[-3000:]
    assert r.stderr.count("wandb failed to") == 1, r.stderr
    assert sorted(read_metrics(tmp_path / "run")) == [1, 2]
