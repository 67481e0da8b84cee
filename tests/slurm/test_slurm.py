"""The cluster path on a real local SLURM (2 emulated nodes, CPU, gloo): the README commands verbatim.

Jobs are submitted together at module start (the cluster has room for all of them) and each test
waits for its own: (a) 2-node training writes checkpoints, (b) an afterok eval job writes its JSON,
(c) a pre-emption signal makes training checkpoint, requeue and continue from that checkpoint,
(d) submitit submits the same training; extraction runs as a submitit job array first.
"""
from __future__ import annotations

import json
import math
import re
import sys
import time
from pathlib import Path

import pytest
import yaml

from slurm_helpers import REPO
from vqd_scale.launch.timeline import read_jsonl

pytestmark = pytest.mark.slurm

STEPS = 24  # optimizer steps of every training run here
PER_STEP = 32  # tiny.yaml batch 16 x 2 ranks
TIMEOUT = 240  # s per wait: the first DeepSpeed run JIT-compiles a comm op (~35 s)


def _complete_steps(run_dir: Path) -> list[int]:
    from vqd_scale.train.checkpoint import list_complete
    return [s for s, _ in list_complete(run_dir)] if (run_dir / "checkpoints").exists() else []


def _write_config(work: Path, tokens: Path, tokenizer: Path) -> Path:
    """configs/tiny.yaml pointed at the extracted shards, logging every step (the file a user writes)."""
    cfg = yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text())
    cfg["data"]["sources"] = [{"name": "synthetic", "shards": f"{tokens}/{{00000..00001}}.tar"}]
    cfg["data"]["manifest"] = str(tokens / "manifest.json")
    cfg["max_samples"] = STEPS * PER_STEP
    cfg["checkpoint"]["every_steps"] = 4
    cfg["logging"] = {"every_steps": 1, "wandb_mode": "disabled"}
    cfg["eval"] = {"shards": f"{tokens}/00001.tar", "num_samples": 8, "sampler": {"steps": 4, "batch_size": 8},
                   "tokenizer": str(tokenizer), "clip_model": "tiny", "metrics": ["fid", "clip_score"],
                   "grid_size": 4}
    path = work / "tiny_cluster.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def tokens(slurm_cluster) -> Path:
    """Synthetic img2dataset shards → k-means tokenizer → token shards via a submitit job array."""
    c, work = slurm_cluster, slurm_cluster.work
    raw, tok, out = work / "raw", work / "tokenizer", work / "tokens"
    c.run([sys.executable, "tools/make_synthetic.py", "--out", str(raw), "--shards", "2", "--per-shard", "32",
           "--resolution", "32"])
    c.run([sys.executable, "tools/fit_tokenizer.py", "--out", str(tok), "--resolution", "32", "--patch", "4",
           "--codes", "32", "--images", "256"])
    r = c.run([sys.executable, "tools/submit.py", "extract", "--cluster", "slurm", "--folder", str(work / "submitit"),
               "--inputs", f"{raw}/{{00000..00001}}.tar", "--cpus-per-task", "1", "--time", "10",
               "--", "--out-dir", str(out), "--tokenizer", str(tok), "--resolution", "32", "--num-workers", "0",
               "--no-progress"])
    array_id = re.search(r"extract\[2 tasks\]: job (\d+)_0", r.stdout).group(1)
    manifest_job = re.search(r"manifest: job (\d+)", r.stdout).group(1)
    for jid in (f"{array_id}_0", f"{array_id}_1", manifest_job):
        c.assert_completed(jid, c.wait_done(jid, TIMEOUT))
    assert sorted(p.name for p in out.glob("*.done.json")) == ["00000.done.json", "00001.done.json"]
    manifest = yaml.safe_load((out / "manifest.json").read_text())
    assert manifest["totals"]["written"] == 64, manifest
    return out


@pytest.fixture(scope="module")
def jobs(slurm_cluster, tokens) -> dict:
    """Submit (a) train, (b) eval afterok, (c) train to pre-empt, (d) submitit train, all at once."""
    c, work = slurm_cluster, slurm_cluster.work
    config = _write_config(work, tokens, work / "tokenizer")
    cpu = ["--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=0", "--cpus-per-task=1",
           f"--output={c.logs}/%x-%j.out"]
    out = {"config": config, "run_a": work / "runs" / "a", "run_c": work / "runs" / "c", "run_d": work / "runs" / "d"}
    out["a"] = c.sbatch([*cpu, "slurm/train_laion.sh"], env=c.env(CONFIG=str(config), RUN_DIR=str(out["run_a"])))
    out["b"] = c.sbatch([f"--dependency=afterok:{out['a']}", "--gpus-per-node=0", "--cpus-per-task=1",
                         f"--output={c.logs}/%x-%j.out", "slurm/eval.sh"], env=c.env(RUN_DIR=str(out["run_a"])))
    out["c"] = c.sbatch([*cpu, "slurm/train_laion.sh"], env=c.env(CONFIG=str(config), RUN_DIR=str(out["run_c"])))
    r = c.run([sys.executable, "tools/submit.py", "train", str(config), f"run_dir={out['run_d']}",
               "--cluster", "slurm", "--nodes", "2", "--cpus-per-task", "1", "--time", "10",
               "--folder", str(work / "submitit")])
    out["d"] = re.search(r"train: job (\d+)", r.stdout).group(1)
    out["d_stdout"] = r.stdout
    return out


def test_requeue_exit_code_matches_trainer():
    """slurm/common.sh requeues on the exit code vqd-train uses for 'checkpointed on a signal'."""
    from vqd_scale.train.signals import EXIT_PREEMPTED
    text = (REPO / "slurm" / "common.sh").read_text()
    assert f'VQD_REQUEUE_EXIT="${{VQD_REQUEUE_EXIT:-{EXIT_PREEMPTED}}}"' in text


def test_bad_config_path_fails_with_message(slurm_cluster):
    c = slurm_cluster
    jid = c.sbatch(["--nodes=1", "--ntasks-per-node=1", "--gpus-per-node=0", "--cpus-per-task=1", f"--output={c.logs}/%x-%j.out",
                    "slurm/train_laion.sh"], env=c.env(CONFIG="configs/does_not_exist.yaml", RUN_DIR=str(c.work / "x")))
    info = c.wait_done(jid, 60)
    assert info["JobState"] == "FAILED"
    assert "CONFIG=configs/does_not_exist.yaml does not exist" in c.log_tail(jid)


@pytest.fixture(scope="module")
def preempted(slurm_cluster, jobs) -> dict:
    """Pre-empt (c) and (d) once each has a complete checkpoint; returns the signal times."""
    c, sent = slurm_cluster, {}
    for key in ("c", "d"):
        jid, run = jobs[key], jobs[f"run_{key}"]
        c.wait_for(lambda: _complete_steps(run), TIMEOUT, "the first complete checkpoint", jid)
        if key == "c":  # what --signal=B:USR2@T does near the time limit, to the batch shell
            c.run(["scancel", "--signal=USR1", "--batch", jid])
        else:  # what submitit's job._interrupt() sends on pre-emption: TERM, then its USR2 to every task
            c.run(["scancel", jid, "--signal", "SIGTERM"])
            c.run(["scancel", jid, "--signal", "USR2"])
        sent[key] = time.time()
    return sent


def _check_continues(c, jobs, key: str) -> int:
    """The requeued run's metrics go 1..saved then saved+1..STEPS and equal the uninterrupted run (a)'s."""
    jid, run = jobs[key], jobs[f"run_{key}"]
    info = c.wait_done(jid, TIMEOUT)
    c.assert_completed(jid, info)
    assert int(info["Restarts"]) >= 1, f"job {jid} was not requeued\n{c.log_tail(jid)}"
    log = "\n".join(p.read_text(errors="replace") for p in _logs(c, jobs, key))
    saved = int(re.search(r"checkpoint written at step (\d+)", log).group(1))
    assert f"at step {saved} (" in log, "the requeued job did not resume from the pre-emption checkpoint"
    assert 4 <= saved < STEPS
    metrics = read_jsonl(run / "metrics.jsonl")
    # each step logged exactly once: resume started right after the pre-emption checkpoint
    assert [m["step"] for m in metrics] == list(range(1, STEPS + 1))
    # the requeued run continues the uninterrupted run (a) exactly: same config, seed, data and world size
    c.wait_done(jobs["a"], TIMEOUT)
    loss_a = {m["step"]: m["loss"] for m in read_jsonl(jobs["run_a"] / "metrics.jsonl")}
    for m in metrics:
        assert math.isclose(m["loss"], loss_a[m["step"]], rel_tol=1e-6, abs_tol=1e-7), (m["step"], m["loss"])
    return saved


def _logs(c, jobs, key: str) -> list[Path]:
    if key == "d":  # submitit: one log per task
        return sorted((c.work / "submitit").glob(f"{jobs['d']}_*_log.*"))
    return [Path(c.job(jobs[key])["StdOut"])]


@pytest.mark.slow  # shares jobs that take ~2 min together
def test_c_preemption_checkpoints_requeues_and_continues(slurm_cluster, jobs, preempted):
    c, run = slurm_cluster, jobs["run_c"]
    saved = _check_continues(c, jobs, "c")
    events = read_jsonl(run / "slurm_jobs.jsonl")
    assert [e["event"] for e in events] == ["start", "requeue", "start"], events
    assert [e["restart_count"] for e in events if e["event"] == "start"] == [0, 1]
    assert events[0]["time"] < preempted["c"] < events[1]["time"] < events[2]["time"]
    metrics = read_jsonl(run / "metrics.jsonl")
    assert max(m["step"] for m in metrics if m["time"] < events[1]["time"]) == saved
    from vqd_scale.launch.timeline import timeline
    rows = timeline(run)
    assert [r["restart_count"] for r in rows] == [0, 1]
    assert 0 < rows[1]["requeue_to_start_s"] < rows[1]["requeue_to_first_step_s"]
    print("timeline (c):", rows)  # figures for docs/performance.md (pytest -s)


@pytest.mark.slow  # shares jobs that take ~2 min together
def test_a_two_node_training_writes_checkpoints(slurm_cluster, jobs):
    c, run = slurm_cluster, jobs["run_a"]
    c.assert_completed(jobs["a"], c.wait_done(jobs["a"], TIMEOUT))
    assert _complete_steps(run)[-1] == STEPS
    steps = [m["step"] for m in read_jsonl(run / "metrics.jsonl")]
    assert steps == list(range(1, STEPS + 1))
    starts = [e for e in read_jsonl(run / "slurm_jobs.jsonl") if e["event"] == "start"]
    assert [(e["job_id"], e["nodes"], e["tasks_per_node"]) for e in starts] == [(jobs["a"], "node[1-2]", 1)]
    assert (run / "config.yaml").exists()


@pytest.mark.slow  # shares jobs that take ~2 min together
def test_b_eval_after_training_writes_results(slurm_cluster, jobs):
    c = slurm_cluster
    info = c.wait_done(jobs["b"], TIMEOUT)
    c.assert_completed(jobs["b"], info)
    train = c.wait_done(jobs["a"], TIMEOUT)
    assert info["StartTime"] >= train["EndTime"], (info["StartTime"], train["EndTime"])  # afterok held it back
    results = sorted((jobs["run_a"] / "eval").glob("*.json"))
    assert results, f"no eval/<step>.json in {jobs['run_a']}\n{c.log_tail(jobs['b'])}"
    final = jobs["run_a"] / "eval" / f"{STEPS}.json"
    assert final.exists(), f"no result for the final checkpoint; have {[p.name for p in results]}"
    result = json.loads(final.read_text())
    assert "fid" in json.dumps(result) and "clip_score" in json.dumps(result), result


@pytest.mark.slow  # shares jobs that take ~2 min together
def test_d_submitit_training_checkpoints_requeues_and_continues(slurm_cluster, jobs, preempted):
    c, jid = slurm_cluster, jobs["d"]
    stdout = Path(re.search(r"train: job \d+  stdout (\S+)", jobs["d_stdout"]).group(1))
    _check_continues(c, jobs, "d")
    assert stdout.exists(), f"submit.py printed a log path that was never written: {stdout}"
    # submitit's handler ran TrainJob.checkpoint() in rank 0 (its `scontrol requeue` is then ended by the
    # requeue itself, so submitit's own "Requeued job" line never appears)
    assert "Calling checkpoint method." in (c.work / "submitit" / f"{jid}_0_log.out").read_text()
    # submitit's result pickle says the callable returned (read directly: no accounting for job.result())
    import pickle
    result = pickle.loads(next((c.work / "submitit").glob(f"{jid}_0_result.pkl")).read_bytes())
    assert result[0] == "success", result
