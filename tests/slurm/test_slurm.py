"""The cluster path on a real local SLURM (2 emulated nodes, CPU, gloo): the README commands verbatim.

Jobs are submitted together at module start (the cluster has room for all of them) and each test
waits for its own: (a) 2-node training writes checkpoints, (b) an afterok eval job writes its JSON,
(c) a pre-emption signal makes training checkpoint, requeue and continue from that checkpoint, its
overrides coming from OVERRIDES_FILE, (w) a watcher submitted before (c) waits for that run to appear,
is requeued by SLURM itself midway and evaluates it to the end, (d) submitit submits the same training,
(e) a plain `scancel` stops a training job for good. Extraction runs first, as a submitit job array
and as the sbatch array + manifest job of the README.
"""
from __future__ import annotations

import json
import math
import os
import pickle
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from slurm_helpers import REPO
from vqd_scale.config import save_config
from vqd_scale.families import load_config
from vqd_scale.launch.timeline import read_jsonl

pytestmark = pytest.mark.slurm

STEPS = 24  # optimizer steps of every training run here
PER_STEP = 32  # tiny.yaml batch 16 x 2 ranks
TIMEOUT = 240  # s per wait: the first DeepSpeed run JIT-compiles a comm op (~35 s)


def _complete_steps(run_dir: Path) -> list[int]:
    from vqd_scale.rundir import list_complete
    return [s for s, _ in list_complete(run_dir)] if (run_dir / "checkpoints").exists() else []


def _overrides(tokens: Path, tokenizer: Path) -> list[str]:
    """configs/tiny.yaml pointed at the extracted shards, logging every step: what a user overrides,
    one per line as in an OVERRIDES_FILE (the README's data.sources override has spaces and quotes)."""
    return [f'data.sources=[{{name: synthetic, shards: "{tokens}/{{00000..00001}}.tar"}}]',
            f"data.manifest={tokens}/manifest.json", f"max_samples={STEPS * PER_STEP}", "checkpoint.every_steps=4",
            "logging.every_steps=1", "logging.wandb_mode=disabled", f"eval.shards={tokens}/00001.tar",
            "eval.num_samples=8", "eval.sampler.steps=4", "eval.sampler.batch_size=8", f"eval.tokenizer={tokenizer}",
            "eval.clip_model=tiny", "eval.metrics=[fid,clip_score]", "eval.grid_size=4"]


def test_node_failure_drill_keeps_a_downed_node_down(slurm_cluster):
    """ReturnToService=1 (tools/local_slurm.py's default): a node set DOWN by hand stays down until
    RESUME, so a node-failure drill can be run (with 2, slurmd put it back within milliseconds)."""
    c = slurm_cluster
    jid = c.sbatch(["--nodes=1", "--nodelist=node2", "--requeue", "--cpus-per-task=1", "--output=/dev/null",
                    "--wrap", "sleep 300"])
    c.wait_for(lambda: c.job(jid).get("JobState") == "RUNNING", 60, "the job to run on node2", jid)

    def node2() -> str:
        return c.run(["sinfo", "-h", "-N", "-n", "node2", "-o", "%t"]).stdout.strip()
    try:
        c.run(["scontrol", "update", "NodeName=node2", "State=DOWN", "Reason=drill"])
        seen = set()
        for _ in range(10):  # the job on it is requeued (what the drill is for); the node must stay down
            seen.add(node2())
            time.sleep(0.3)
        assert seen == {"down"}, seen
        assert c.job(jid)["JobState"] in ("PENDING", "REQUEUED", "COMPLETING"), c.job(jid)
    finally:
        c.run(["scancel", jid], check=False)
        c.run(["scontrol", "update", "NodeName=node2", "State=RESUME"], check=False)
    c.wait_for(lambda: node2() == "idle", 60, "node2 to come back after RESUME", jid)


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
def extraction(slurm_cluster) -> dict:
    """Synthetic img2dataset shards → k-means tokenizer → token shards, twice at once: a submitit job
    array (+ its manifest task), and README's sbatch array on CPU + slurm/extract_manifest.sh."""
    c, work = slurm_cluster, slurm_cluster.work
    raw, tok, out, out_sb = work / "raw", work / "tokenizer", work / "tokens", work / "tokens_sbatch"
    c.run([sys.executable, "tools/make_synthetic.py", "--out", str(raw), "--shards", "2", "--per-shard", "32",
           "--resolution", "32"])
    c.run([sys.executable, "tools/fit_tokenizer.py", "--out", str(tok), "--resolution", "32", "--patch", "4",
           "--codes", "32", "--images", "256"])
    r = c.run([sys.executable, "tools/submit.py", "extract", "--cluster", "slurm", "--folder", str(work / "submitit"),
               "--inputs", f"{raw}/{{00000..00001}}.tar", "--cpus-per-task", "1", "--time", "10",
               "--", "--out-dir", str(out), "--tokenizer", str(tok), "--resolution", "32", "--num-workers", "0",
               "--source", "synthetic", "--no-progress"])
    env = c.env(INPUTS=f"{raw}/{{00000..00001}}.tar", OUT=str(out_sb), TOKENIZER=str(tok), RESOLUTION="32",
                SOURCE="synthetic")
    here = [f"--chdir={work}"]  # the scripts' own logs/%x-... patterns, under work/logs
    array = c.sbatch([*here, "--array=0-1", "--gpus-per-node=0", "--cpus-per-task=1", "slurm/extract_tokens.sh"],
                     env=env)
    manifest = c.sbatch([*here, f"--dependency=afterok:{array}", "slurm/extract_manifest.sh"], env=env)
    return {"out": out, "submit_stdout": r.stdout, "out_sbatch": out_sb, "array": array, "manifest_job": manifest}


@pytest.fixture(scope="module")
def tokens(slurm_cluster, extraction) -> Path:
    c, out = slurm_cluster, extraction["out"]
    array_id = re.search(r"extract\[2 tasks\]: job (\d+)_0", extraction["submit_stdout"]).group(1)
    manifest_job = re.search(r"manifest: job (\d+)", extraction["submit_stdout"]).group(1)
    for jid in (f"{array_id}_0", f"{array_id}_1", manifest_job):
        c.assert_completed(jid, c.wait_done(jid, TIMEOUT))
    assert sorted(p.name for p in out.glob("*.done.json")) == ["00000.done.json", "00001.done.json"]
    manifest = yaml.safe_load((out / "manifest.json").read_text())
    assert manifest["totals"]["written"] == 64, manifest
    return out


@pytest.fixture(scope="module")
def jobs(slurm_cluster, tokens) -> dict:
    """Submit (w) a watcher, (a) train, (b) eval afterok, (e) train to cancel, (d) submitit train, then
    (c) train to pre-empt once the watcher waits for it; all at once."""
    c, work = slurm_cluster, slurm_cluster.work
    lines = _overrides(tokens, work / "tokenizer")
    config = work / "tiny_cluster.yaml"  # the same settings as one config file (what (a) and (b) read)
    save_config(load_config(REPO / "configs" / "tiny.yaml", lines), config)
    ofile = work / "overrides.txt"
    ofile.write_text("# one override per line, verbatim\n" + "\n".join(lines) + "\n")
    cpu = ["--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=0", "--cpus-per-task=1",
           f"--output={c.logs}/%x-%j.out"]
    out = {"config": config}
    for k in "acde":
        out[f"run_{k}"] = work / "runs" / k
    # (w): README's watcher line, submitted before its training job exists
    out["w"] = c.sbatch(["--gpus-per-node=0", "--cpus-per-task=1", f"--output={c.logs}/%x-%j.out", "slurm/eval.sh"],
                        env=c.env(RUN_DIR=str(out["run_c"]), EVAL_MODE="watch",
                                  EVAL_ARGS="eval.poll_seconds=1 --wait-for-run 600"))
    out["a"] = c.sbatch([*cpu, "slurm/train_laion.sh"], env=c.env(CONFIG=str(config), RUN_DIR=str(out["run_a"])))
    out["b"] = c.sbatch([f"--dependency=afterok:{out['a']}", "--gpus-per-node=0", "--cpus-per-task=1",
                         f"--output={c.logs}/%x-%j.out", "slurm/eval.sh"], env=c.env(RUN_DIR=str(out["run_a"])))
    # (e): one node; the README's data.sources override quoted inside OVERRIDES (tiny.yaml has no sources)
    quoted = " ".join(f"'{ln}'" for ln in lines[:2]) + " max_samples=10000000 checkpoint.every_steps=4"
    out["e"] = c.sbatch(["--nodes=1", *cpu[1:], "slurm/train_laion.sh"],
                        env=c.env(CONFIG="configs/tiny.yaml", RUN_DIR=str(out["run_e"]), OVERRIDES=quoted))
    env = c.env()
    env.pop("TORCH_EXTENSIONS_DIR")  # submitit's jobs must find DeepSpeed's compiled op by themselves
    r = c.run([sys.executable, "tools/submit.py", "train", str(config), f"run_dir={out['run_d']}",
               "--cluster", "slurm", "--nodes", "2", "--cpus-per-task", "1", "--time", "10",
               "--folder", str(work / "submitit")], env=env)
    out["d"] = re.search(r"train: job (\d+)", r.stdout).group(1)
    out["d_stdout"] = r.stdout
    c.wait_for(lambda: "waiting up to 600 s" in c.log_tail(out["w"]), TIMEOUT, "the watcher to wait", out["w"])
    assert not out["run_c"].joinpath("config.yaml").exists()
    out["c"] = c.sbatch([*cpu, "slurm/train_laion.sh"],
                        env=c.env(CONFIG="configs/tiny.yaml", RUN_DIR=str(out["run_c"]), OVERRIDES_FILE=str(ofile)))
    return out


def _trainer_environ(run_dir: Path) -> list[dict]:
    """Environment of the running vqd-train processes of `run_dir` (this machine hosts the 'nodes')."""
    out = []
    for d in Path("/proc").iterdir():
        try:
            cmd = (d / "cmdline").read_bytes().split(b"\0") if d.name.isdigit() else []
            if b"vqd_scale.cli.train" in cmd and f"run_dir={run_dir}".encode() in cmd:
                env = (d / "environ").read_bytes().split(b"\0")
                out.append(dict(e.decode().split("=", 1) for e in env if b"=" in e))
        except OSError:
            continue
    return out


@pytest.fixture(scope="module")
def preempted(slurm_cluster, jobs) -> dict:
    """Pre-empt (d) and (c), cancel (e), once each has a complete checkpoint, then let SLURM requeue
    the watcher (w) itself; returns the signal times."""
    c, sent = slurm_cluster, {}
    for key in ("d", "e", "c"):  # in the order they were submitted: each is signalled at its first checkpoint
        jid, run = jobs[key], jobs[f"run_{key}"]
        c.wait_for(lambda: _complete_steps(run), TIMEOUT, "the first complete checkpoint", jid)
        if key == "c":  # what --signal=B:USR2@T does near the time limit, to the batch shell
            c.run(["scancel", "--signal=USR1", "--batch", jid])
        elif key == "d":  # what submitit's job._interrupt() sends on pre-emption: TERM, then its USR2 to every task
            sent["d_environ"] = _trainer_environ(run)
            c.run(["scancel", jid, "--signal", "SIGTERM"])
            c.run(["scancel", jid, "--signal", "USR2"])
        else:  # stop for good
            c.run(["scancel", jid])
        sent[key] = time.time()
    # SLURM requeues the watcher itself (as on pre-emption with PreemptMode=REQUEUE): SIGTERM to every process
    c.run(["scontrol", "requeue", jobs["w"]])
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


def _check_timeline(run: Path, sent: float) -> list[dict]:
    """slurm_jobs.jsonl: start, requeue (after the signal), start again; the timeline reads it."""
    events = [e for e in read_jsonl(run / "slurm_jobs.jsonl") if e["event"] in ("start", "requeue")]  # not eval's
    assert [e["event"] for e in events] == ["start", "requeue", "start"], events
    assert [e["restart_count"] for e in events if e["event"] == "start"] == [0, 1]
    assert events[0]["time"] < sent < events[1]["time"] < events[2]["time"]
    from vqd_scale.launch.timeline import timeline
    rows = timeline(run)
    assert [r["restart_count"] for r in rows] == [0, 1]
    assert 0 < rows[1]["requeue_to_start_s"] < rows[1]["requeue_to_first_step_s"]
    return rows


@pytest.mark.slow
def test_e_scancel_stops_training_for_good(slurm_cluster, jobs, preempted):
    """A plain `scancel` (SIGTERM to the batch shell and every task): the ranks may save, but the job
    ends CANCELLED and is not requeued (was: saved, exit 42, requeued itself and ran to COMPLETED)."""
    c, jid, run = slurm_cluster, jobs["e"], jobs["run_e"]
    info = c.wait_done(jid, TIMEOUT)
    log = c.log_tail(jid, 400)
    assert info["JobState"] == "CANCELLED" and info["Restarts"] == "0", (info, log)  # final: CANCELLED is terminal
    assert [e["event"] for e in read_jsonl(run / "slurm_jobs.jsonl")] == ["start"]
    assert log.count("caught SIGTERM") == 1 and "requeuing job" not in log, log
    assert not (run / "DONE").exists()
    assert not _trainer_environ(run)  # nothing of it runs any more (its processes were this machine's)


@pytest.mark.slow  # shares jobs that take ~2 min together
def test_c_preemption_checkpoints_requeues_and_continues(slurm_cluster, jobs, preempted):
    c, run = slurm_cluster, jobs["run_c"]
    saved = _check_continues(c, jobs, "c")  # with OVERRIDES_FILE: the same run as (a)'s config file
    rows = _check_timeline(run, preempted["c"])
    events = [e for e in read_jsonl(run / "slurm_jobs.jsonl") if e["event"] in ("start", "requeue")]
    metrics = read_jsonl(run / "metrics.jsonl")
    assert max(m["step"] for m in metrics if m["time"] < events[1]["time"]) == saved
    print("timeline (c):", rows)  # figures for docs/performance.md (pytest -s)


@pytest.mark.slow
def test_w_watcher_started_before_training_waits_and_evaluates(slurm_cluster, jobs, preempted):
    c, jid, run = slurm_cluster, jobs["w"], jobs["run_c"]
    info = c.wait_done(jid, TIMEOUT)
    c.assert_completed(jid, info)
    log = c.log_tail(jid, 400)
    assert "waiting up to 600 s" in log and re.search(r"evaluated [1-9]\d* checkpoint\(s\)", log), log
    # SLURM's own requeue brought it back once; the script did not requeue it a second time
    assert info["Restarts"] == "1" and log.count("caught SIGTERM") == 1 and "requeuing job" not in log, log
    starts = [e["restart_count"] for e in read_jsonl(run / "slurm_jobs.jsonl") if e["event"] == "eval_start"]
    assert starts == [0, 1], starts
    final = json.loads((run / "eval" / f"{STEPS}.json").read_text())  # the watcher followed the run to its end
    # the tiny random CLIP tower makes FID/CLIP score not meaningful: reported apart, never as plain metrics
    computed = {**final["metrics"], **final.get("not_meaningful", {})}
    assert "fid" in computed and "clip_score" in computed and "fid" not in final["metrics"], final


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
    c, jid, folder = slurm_cluster, jobs["d"], slurm_cluster.work / "submitit"
    stdout = Path(re.search(r"train: job \d+  stdout (\S+)", jobs["d_stdout"]).group(1))
    # the trainer found DeepSpeed's compiled op where the sbatch jobs keep it (else ~170 s to rebuild it)
    assert [e.get("TORCH_EXTENSIONS_DIR") for e in preempted["d_environ"]] == \
        [os.path.expanduser("~/.cache/vqd_scale/torch_extensions")] * 2, preempted["d_environ"]
    _check_continues(c, jobs, "d")
    assert stdout.exists(), f"submit.py printed a log path that was never written: {stdout}"
    # submitit's handler ran TrainJob.checkpoint() in rank 0 (its `scontrol requeue` is then ended by the
    # requeue itself, so submitit's own "Requeued job" line never appears)
    assert "Calling checkpoint method." in (folder / f"{jid}_0_log.out").read_text()
    # submitit's result pickle says the callable returned (read directly: no accounting for job.result())
    result = pickle.loads(next(folder.glob(f"{jid}_0_result.pkl")).read_bytes())
    assert result[0] == "success", result
    # the requeued submission may time out 49 more times (submitit's default allows 3 in all)
    from vqd_scale.launch.submit import Resources
    countdown = pickle.loads((folder / f"{jid}_submitted.pkl").read_bytes())._timeout_countdown
    assert countdown >= Resources.max_requeues - 1, countdown
    events = _check_timeline(jobs["run_d"], preempted["d"])  # submitit runs write the timeline too
    assert read_jsonl(jobs["run_d"] / "slurm_jobs.jsonl")[0]["launcher"] == "submitit", events


def test_extract_array_on_cpu_then_manifest_job(slurm_cluster, extraction, tokens):
    """README's sbatch extraction with CPU flags (WORKERS from the CPUs), then the manifest job: the same
    tokens as the submitit array, and a log named by its job id (not %a of a non-array job)."""
    c, out, array = slurm_cluster, extraction["out_sbatch"], extraction["array"]
    for task in (0, 1):
        info = c.wait_done(f"{array}_{task}", TIMEOUT)
        c.assert_completed(f"{array}_{task}", info)
        assert Path(info["StdOut"]) == c.logs / f"vqd-extract-{array}_{task}.out", info["StdOut"]
        assert f"extract task {task}/2 device=cpu workers=0 " in c.log_tail(f"{array}_{task}")  # 1 CPU: no workers
    mjid = extraction["manifest_job"]
    info = c.wait_done(mjid, TIMEOUT)
    c.assert_completed(mjid, info)
    assert Path(info["StdOut"]) == c.logs / f"vqd-extract-manifest-{mjid}.out", info["StdOut"]  # no %a
    assert "extract task 0/1 device=cpu workers=1 " in c.log_tail(mjid)
    assert json.loads((out / "manifest.json").read_text()) == json.loads((tokens / "manifest.json").read_text())
    for name in ("00000.tar", "00001.tar"):  # the same samples as the submitit array's
        assert _tar_members(out / name) == _tar_members(tokens / name), name


def _tar_members(path: Path) -> dict[str, bytes]:
    import tarfile
    with tarfile.open(path) as t:
        return {m.name: t.extractfile(m).read() for m in t.getmembers() if m.isfile()}
