"""The eval watcher: each complete checkpoint evaluated exactly once, incomplete ones skipped,
claims shared between concurrent evaluators, stale claims retaken, watch-mode exit conditions."""
import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from vqd_scale.config import TransformerConfig, save_config
from vqd_scale.families import RunConfig
from vqd_scale.eval import watch as W
from vqd_scale.models.transformer import VQDiffusionTransformer
from vqd_scale.rundir import load_weights

MODEL_CFG = TransformerConfig(size="debug", num_classes=16, height=4, width=4, context_dim=32, layers=1)


def make_ckpt(run_dir: Path, step: int, complete: bool = True, samples_seen: int = 0, seed: int = 0) -> Path:
    """A checkpoint dir as the run-directory contract describes it: real tiny model's EMA weights,
    config, and complete.json written last (omitted for an incomplete one)."""
    torch.manual_seed(seed)
    model = VQDiffusionTransformer(MODEL_CFG)
    d = run_dir / "checkpoints" / f"step_{step:08d}"
    d.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(d / "ema.safetensors"))
    (d / "config.yaml").write_text((run_dir / "config.yaml").read_text())
    if complete:
        (d / "complete.json").write_text(json.dumps({"step": step, "samples_seen": samples_seen, "world_size": 1}))
    return d


@pytest.fixture
def run_dir(tmp_path):
    save_config(RunConfig(max_samples=1000), tmp_path / "config.yaml")
    return tmp_path


def _evaluator(run_dir, calls):
    """Loads the real weights (what the job does first) and writes the result file last."""
    def evaluate(step, path):
        sd = load_weights(path)
        calls.append((step, float(sd["null_context"].sum())))
        W.result_path(run_dir, step).write_text(json.dumps({"step": step}))
    return evaluate


def _run(run_dir, evaluate, **kw):
    args = dict(watch=False, poll_seconds=1.0, idle_timeout=10.0, stale_seconds=3600.0)
    args.update(kw)
    return W.run(run_dir, evaluate, **args)


def test_each_complete_checkpoint_once_incomplete_skipped(run_dir):
    make_ckpt(run_dir, 200, seed=2)
    make_ckpt(run_dir, 100, seed=1)
    make_ckpt(run_dir, 300, complete=False, seed=3)
    calls = []
    assert _run(run_dir, _evaluator(run_dir, calls)) == [100, 200]
    # The weights evaluated are the ones saved for that step (seed 1 then seed 2).
    for (step, s), seed in zip(calls, (1, 2)):
        torch.manual_seed(seed)
        assert s == pytest.approx(float(VQDiffusionTransformer(MODEL_CFG).null_context.detach().sum()))
    assert not list((run_dir / "eval").glob("*.lock"))
    assert _run(run_dir, _evaluator(run_dir, calls)) == []  # second run: nothing new
    (run_dir / "checkpoints" / "step_00000300" / "complete.json").write_text(json.dumps({"step": 300}))
    assert _run(run_dir, _evaluator(run_dir, calls)) == [300]
    assert [c[0] for c in calls] == [100, 200, 300]


def test_failed_evaluation_leaves_step_pending(run_dir):
    make_ckpt(run_dir, 100)

    def boom(step, path):
        raise RuntimeError("sampler exploded")
    with pytest.raises(RuntimeError, match="exploded"):
        _run(run_dir, boom)
    assert not W.lock_path(run_dir, 100).exists() and [s for s, _ in W.pending(run_dir)] == [100]
    calls = []
    assert _run(run_dir, _evaluator(run_dir, calls)) == [100]


def test_checkpoint_pruned_while_evaluated_is_skipped(run_dir):
    """Training's keep_last deletes an old checkpoint under a slow watcher: skip it, evaluate the rest."""
    import shutil
    for step in (100, 200):
        make_ckpt(run_dir, step, seed=step)
    calls, real = [], _evaluator(run_dir, [])

    def pruned_first(step, path):
        if step == 100:
            shutil.rmtree(path)  # what checkpoint.prune does
        calls.append(step)
        real(step, path)  # loads the weights: fails for the deleted one
    assert _run(run_dir, pruned_first) == [200] and calls == [100, 200]
    assert not list((run_dir / "eval").glob("*.lock")) and W.pending(run_dir) == []


def test_live_claim_is_respected_stale_claim_retaken(run_dir):
    make_ckpt(run_dir, 100)
    make_ckpt(run_dir, 200)
    (run_dir / "eval").mkdir()
    live = W._owner()  # this very process: alive
    W.lock_path(run_dir, 100).write_text(json.dumps(live))
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    W.lock_path(run_dir, 200).write_text(json.dumps({**live, "pid": int(dead.stdout), "slurm_job": None}))
    calls = []
    assert _run(run_dir, _evaluator(run_dir, calls)) == [200]  # 100 is another evaluator's, 200's owner is gone
    old = {**live, "host": "elsewhere", "time": 0.0}
    W.lock_path(run_dir, 100).write_text(json.dumps(old))  # a claim from another host, far too old
    assert _run(run_dir, _evaluator(run_dir, calls)) == [100]


def test_requeued_slurm_job_retakes_its_own_claim(run_dir, monkeypatch):
    make_ckpt(run_dir, 100)
    (run_dir / "eval").mkdir()
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    # Claimed by this job's first attempt on another node, moments ago (pid not checkable from here).
    first = {**W._owner(), "host": "node7", "pid": 1, "slurm_restart": "0"}
    W.lock_path(run_dir, 100).write_text(json.dumps(first))
    other_task = {**first, "slurm_restart": "1"}  # same attempt, another live evaluator: respected
    assert not W._is_stale(other_task, 3600.0)
    calls = []
    assert _run(run_dir, _evaluator(run_dir, calls)) == [100]


def test_concurrent_claims_never_duplicate(run_dir):
    for s in (100, 200, 300, 400):
        make_ckpt(run_dir, s)
    got, barrier = [], threading.Barrier(4)

    def worker():
        barrier.wait()
        while (item := W.claim_next(run_dir, 3600.0)) is not None:
            got.append(item[0])
            W.result_path(run_dir, item[0]).write_text("{}")
            W.release(run_dir, item[0])
    threads = [threading.Thread(target=worker) for _ in range(4)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert sorted(got) == [100, 200, 300, 400]


def test_watch_follows_training_until_final_checkpoint(run_dir):
    make_ckpt(run_dir, 100, samples_seen=500)
    script = iter([lambda: None, lambda: make_ckpt(run_dir, 200, complete=False, samples_seen=1000),
                   lambda: (run_dir / "checkpoints/step_00000200/complete.json").write_text(
                       json.dumps({"step": 200, "samples_seen": 1000}))])
    sleeps = []

    def sleep(s):  # each poll, "training" makes progress
        sleeps.append(s)
        next(script)()
    calls = []
    steps = _run(run_dir, _evaluator(run_dir, calls), watch=True, sleep=sleep, poll_seconds=7.0)
    assert steps == [100, 200] and sleeps == [7.0] * 3  # final checkpoint (samples_seen >= max_samples) ends it
    assert W.training_finished(run_dir)


def test_watch_done_marker_and_idle_timeout(run_dir):
    make_ckpt(run_dir, 100)
    now = [0.0]

    def sleep(s):
        now[0] += s
    calls = []
    assert _run(run_dir, _evaluator(run_dir, calls), watch=True, sleep=sleep, clock=lambda: now[0],
                idle_timeout=30.0, poll_seconds=10.0) == [100]
    assert 30.0 < now[0] <= 40.0  # waited for new checkpoints, then gave up
    (run_dir / W.DONE_MARKER).touch()
    now[0] = 0.0
    assert _run(run_dir, _evaluator(run_dir, calls), watch=True, sleep=sleep, clock=lambda: now[0]) == []
    assert now[0] == 0.0  # DONE and nothing pending: no waiting at all


def test_only_step(run_dir):
    make_ckpt(run_dir, 100)
    make_ckpt(run_dir, 200)
    calls = []
    assert _run(run_dir, _evaluator(run_dir, calls), only_step=200) == [200]
    assert [s for s, _ in W.pending(run_dir)] == [100]


def test_wait_for_run_polls_until_config_and_a_complete_checkpoint(tmp_path):
    run_dir = tmp_path / "not_yet"
    now, sleeps = [0.0], []

    def sleep(s):  # "training" starts while the watcher waits: dir, config.yaml, an incomplete, then a complete ckpt
        sleeps.append(s)
        now[0] += s
        if len(sleeps) == 2:
            run_dir.mkdir()
            save_config(RunConfig(max_samples=1000), run_dir / "config.yaml")
            make_ckpt(run_dir, 100, complete=False)
        if len(sleeps) == 4:
            (run_dir / "checkpoints/step_00000100/complete.json").write_text(json.dumps({"step": 100}))
    assert not W.run_appeared(run_dir)
    assert W.wait_for_run(run_dir, 60.0, 5.0, sleep=sleep, clock=lambda: now[0])
    assert sleeps == [5.0] * 4 and W.run_appeared(run_dir)
    now[0], sleeps[:] = 0.0, []
    assert not W.wait_for_run(tmp_path / "never", 12.0, 5.0, sleep=lambda s: (sleeps.append(s), now.append(now.pop() + s)),
                              clock=lambda: now[0])
    assert sleeps == [5.0, 5.0, 2.0]  # gave up at the timeout, not a poll later


def test_cli_watch_waits_for_a_run_that_starts_later(tmp_path, monkeypatch, capsys):
    """`vqd-eval RUN --watch` started before training (the README's watcher next to a fresh job):
    it waits instead of failing on the missing config.yaml, then follows the run."""
    from vqd_scale.cli.eval import main
    run_dir, real, checks = tmp_path / "run", W.run_appeared, []

    def appeared(d):
        checks.append(d)
        if len(checks) == 2:  # the watcher already looked once and is waiting: training starts now
            run_dir.mkdir()
            save_config(RunConfig(max_samples=1000), run_dir / "config.yaml")
            make_ckpt(run_dir, 100, samples_seen=1000)
            (run_dir / "eval").mkdir()
            W.result_path(run_dir, 100).write_text("{}")  # already evaluated: nothing to load here
            (run_dir / W.DONE_MARKER).touch()
        return real(d)
    monkeypatch.setattr(W, "run_appeared", appeared)
    assert main([str(run_dir), "--watch", "eval.poll_seconds=0.01"]) == 0
    out = capsys.readouterr()
    assert "waiting up to 3600 s" in out.err and "evaluated 0 checkpoint(s)" in out.out
    assert len(checks) >= 2


def test_cli_watch_gives_up_when_the_run_never_appears(tmp_path, capsys):
    from vqd_scale.cli.eval import main
    assert main([str(tmp_path / "nope"), "--watch", "--wait-for-run", "0.2", "eval.poll_seconds=0.05"]) == 2
    err = capsys.readouterr().err
    assert "did not appear within 0 s" in err and "--wait-for-run" in err and "Traceback" not in err
    assert main([str(tmp_path / "nope"), "--once"]) == 2  # --once never waits
    assert "config.yaml not found" in capsys.readouterr().err


def test_cli_bad_config_yaml_is_one_line(tmp_path, capsys):
    from vqd_scale.cli.eval import main
    save_config(RunConfig(max_samples=1000), tmp_path / "config.yaml")
    (tmp_path / "bad.yaml").write_text("max_samples: [1, 2\nseed: 3\n")
    assert main([str(tmp_path), "--once", "--config", str(tmp_path / "bad.yaml")]) == 2
    err = capsys.readouterr().err.strip()
    assert "YAML syntax error" in err and "line" in err and len(err.splitlines()) == 1, err


def test_two_evaluators_get_two_wandb_runs_a_requeued_one_continues_its_own(run_dir, monkeypatch):
    """Two watchers of one run wrote two offline wandb runs with the same id (syncing them loses one's
    history): one run per evaluator job, one group per run directory, same run after a requeue."""
    import types
    from vqd_scale.eval.job import EvalJob
    monkeypatch.setenv("WANDB_MODE", "offline")
    (run_dir / "eval").mkdir()
    runs = []
    for job, restart in (("101", "0"), ("102", "0"), ("101", "1")):  # watcher, second watcher, 101 requeued
        monkeypatch.setenv("SLURM_JOB_ID", job)
        monkeypatch.setenv("SLURM_RESTART_COUNT", restart)
        ev = types.SimpleNamespace(cfg=RunConfig(max_samples=1000), run_dir=run_dir, _wandb=None)
        EvalJob._log_wandb(ev, 100, {"metrics": {"fid": 1.0}}, None)  # the real method, on a stand-in self
        runs.append((ev._wandb.id, ev._wandb.group))
        EvalJob.close(ev)
    (id1, g1), (id2, g2), (id3, g3) = runs
    assert id1 != id2 and id3 == id1 and g1 == g2 == g3
    # the id from the run file inside each offline-run dir (the dir name gets a "-1" when two share a second)
    written = {f.name[len("run-"):-len(".wandb")] for f in (run_dir / "eval" / "wandb").glob("offline-run-*/run-*.wandb")}
    assert written == {id1, id2}
