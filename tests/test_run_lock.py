"""One writer per run directory: a second training job is refused naming the holder; the lock goes with the
holder's process however it ends; a holder that is certainly gone (dead pid on this host, an earlier run of
the same requeued SLURM job) is broken; evaluators need no lock. Holders run in child processes because a
POSIX lock belongs to a process (the test process taking it twice would not conflict with itself)."""
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from vqd_scale.data.random_shards import write_random_token_shards
from vqd_scale.train import run_lock
from vqd_scale.train.checkpoint import LOCK_FILE

REPO = Path(__file__).resolve().parents[1]
HOLD = """
import sys, time, os
from vqd_scale.train import run_lock
lock = run_lock.acquire(sys.argv[1])
if len(sys.argv) > 2:  # pretend the record was written by another process (see the test)
    os.ftruncate(lock.fd, 0)
    os.pwrite(lock.fd, sys.argv[2].encode(), 0)
print("locked", flush=True)
time.sleep(600)
"""


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]), **extra)
    return env


@pytest.fixture
def holder(tmp_path):
    """Start a process that locks tmp_path/run (optionally with a doctored record); yields (process, run dir)."""
    procs = []

    def start(record=None, **env):
        run = tmp_path / "run"
        run.mkdir(exist_ok=True)
        p = subprocess.Popen([sys.executable, "-c", HOLD, str(run)] + ([json.dumps(record)] if record else []),
                             stdout=subprocess.PIPE, text=True, env=_env(**env))
        procs.append(p)
        assert p.stdout.readline().strip() == "locked"
        return p, run
    yield start
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait()


def _dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def test_second_writer_refused_naming_the_holder_until_it_dies(holder):
    p, run = holder()
    with pytest.raises(run_lock.RunDirLocked, match=rf"pid {p.pid} on host {socket.gethostname()}"):
        run_lock.acquire(run)
    assert not run_lock.is_stale(run_lock.read_holder(run))
    p.send_signal(signal.SIGKILL)  # a crash: no cleanup runs, the kernel drops the lock
    p.wait()
    lock = run_lock.acquire(run)
    assert run_lock.read_holder(run)["pid"] == os.getpid()
    lock.release()
    assert run_lock.read_holder(run) is None  # released: nobody is named any more


def test_lock_held_under_a_record_of_a_dead_local_process_is_broken(holder):
    """What an NFS server shows after the holder's node died: the lock still held, its process gone."""
    record = dict(run_lock.holder_record(), pid=_dead_pid(), pid_start=None)
    _, run = holder(record)
    assert run_lock.is_stale(run_lock.read_holder(run))
    with pytest.warns(UserWarning, match="breaking the lock"):
        lock = run_lock.acquire(run)
    assert run_lock.read_holder(run)["pid"] == os.getpid()
    lock.release()


def test_slurm_requeue_takes_over_its_previous_run_and_no_one_else_does(holder):
    _, run = holder(SLURM_JOB_ID="4242")
    held = run_lock.read_holder(run)
    me = dict(run_lock.holder_record(), host="othernode", slurm_job="4242")
    assert run_lock.is_stale(held, dict(me, slurm_restart=1))  # the same job, requeued: the old run is over
    assert not run_lock.is_stale(held, dict(me, slurm_restart=0))  # a second writer inside the same run
    assert not run_lock.is_stale(held, dict(me, slurm_job="99", slurm_restart=3))  # another job
    assert not run_lock.is_stale(dict(held, host="othernode"), dict(me, slurm_job=None))  # unknown elsewhere
    os.environ.update(SLURM_JOB_ID="4242", SLURM_RESTART_COUNT="1")
    try:
        with pytest.warns(UserWarning, match="SLURM job 4242"):
            run_lock.acquire(run).release()
    finally:
        del os.environ["SLURM_JOB_ID"], os.environ["SLURM_RESTART_COUNT"]


@pytest.mark.slow
def test_vqd_train_refuses_a_locked_run_dir_before_writing(holder, tmp_path):
    p, run = holder()
    data = tmp_path / "data"
    write_random_token_shards(data, 2, 8, (4, 4), 32)
    r = subprocess.run([sys.executable, "-m", "vqd_scale.cli.train", str(REPO / "configs" / "tiny.yaml"),
                        f"run_dir={run}", f'data.sources=[{{name: r, shards: "{data}/{{00000..00001}}.tar"}}]',
                        f"data.manifest={data}/manifest.json", "model.height=4", "model.width=4",
                        "logging.wandb_mode=disabled"], capture_output=True, text=True, timeout=300, cwd=REPO,
                       env=_env(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", WANDB_MODE="disabled"))
    assert r.returncode == 2, r.stderr[-3000:]
    assert f"is being written by another training job (pid {p.pid} on host" in r.stderr and "Traceback" not in r.stderr
    assert sorted(f.name for f in run.iterdir()) == [LOCK_FILE]  # nothing written: no config, metrics, checkpoints
