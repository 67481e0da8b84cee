"""tools/submit.py and vqd_scale.launch without a cluster: refusals, and the submitit checkpoint hook."""
from __future__ import annotations

import pickle
import signal
import subprocess
import sys

import pytest

from slurm_helpers import REPO
from vqd_scale.launch.jobs import TrainJob
from vqd_scale.launch.submit import Resources, expand_shards, make_executor


def _submit(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "tools/submit.py", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=120)


def test_bad_config_is_refused_before_anything_is_queued(tmp_path):
    folder = tmp_path / "submitit"
    r = _submit("train", "configs/tiny.yaml", "optim.lr=-1", "--cluster", "local", "--folder", str(folder))
    assert r.returncode == 2 and r.stderr.startswith("submit.py: error: ") and "optim.lr" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not folder.exists()


@pytest.mark.parametrize("case", ["yaml", "missing", "pattern", "dependency"])
def test_refusals_are_one_line_and_exit_2(case, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("max_samples: [1, 2\n")
    folder = ["--cluster", "local", "--folder", str(tmp_path / "submitit")]
    args = {"yaml": ["train", str(bad), *folder], "missing": ["train", str(tmp_path / "nope.yaml"), *folder],
            "pattern": ["extract", "--inputs", "", *folder], "dependency": ["eval", "runs/x", "--after", "1", *folder]}
    want = {"yaml": "YAML syntax error: did not find expected", "missing": "does not exist", "pattern": "expands to no shards",
            "dependency": "dependencies need SLURM"}
    r = _submit(*args[case])
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert r.stderr.strip().splitlines() == [r.stderr.strip()] and want[case] in r.stderr, r.stderr  # no traceback


def test_submitit_keeps_requeuing_past_its_default_three_timeouts(tmp_path):
    """submitit stops requeuing after max_num_timeout time-outs (default 3); --time promises more."""
    ex = make_executor(tmp_path, "slurm", Resources(), "x")
    assert ex._executor.max_num_timeout == Resources.max_requeues >= 50


def test_executor_refuses_auto_cluster_and_local_dependencies(tmp_path):
    with pytest.raises(ValueError, match="cluster='auto'"):
        make_executor(tmp_path, "auto", Resources(), "x")
    with pytest.raises(ValueError, match="dependencies need SLURM"):
        make_executor(tmp_path, "local", Resources(), "x", dependency="afterok:1")


def test_expand_shards_joins_patterns_and_refuses_empty():
    assert expand_shards("a/{0..1}.tar::b/{5..6}.tar") == ["a/0.tar", "a/1.tar", "b/5.tar", "b/6.tar"]
    with pytest.raises(ValueError, match="no shards"):
        expand_shards("")


class _Requeued(Exception):
    """Stands in for submitit's sys.exit after `scontrol requeue`."""


CHILD = ("import signal, sys, time\n"
         "signal.signal(signal.SIGUSR2, lambda *a: sys.exit(42))  # like vqd-train: save, exit 42\n"
         "print('ready', flush=True)\n"
         "time.sleep(60)\n")


@pytest.mark.timeout(60)
def test_checkpoint_from_a_handler_that_interrupted_wait():
    """submitit calls checkpoint() from its USR2 handler while TrainJob is blocked in Popen.wait()
    (which holds Popen's wait lock): the trainer must be signalled and awaited, then a fresh job returned."""
    job = TrainJob("cfg.yaml", ["run_dir=x"], python="py", save_timeout_s=30)
    proc = subprocess.Popen([sys.executable, "-c", CHILD], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    job._proc = proc
    got = {}

    def handler(signum, frame):
        got["delayed"] = job.checkpoint()
        got["rc"] = proc.returncode
        raise _Requeued

    old = signal.signal(signal.SIGALRM, handler)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.5)
        with pytest.raises(_Requeued):
            proc.wait()  # blocking, lock held: exactly where TrainJob.__call__ waits
    finally:
        signal.signal(signal.SIGALRM, old)
    assert got["rc"] == 42  # the child got SIGUSR2 and was reaped inside the handler
    fresh = got["delayed"].function
    assert isinstance(fresh, TrainJob) and fresh is not job
    assert fresh.command() == ["py", "-m", "vqd_scale.cli.train", "cfg.yaml", "run_dir=x", "--resume", "auto"]
    assert pickle.loads(pickle.dumps(job))._proc is None  # submitit pickles it; a Popen cannot be
