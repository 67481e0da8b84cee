"""Real DeepSpeed runs of the tiny model on CPU (gloo): 2 ranks under torchrun for ZeRO-2/3 and exact
resume after SIGKILL; single-process runs for a crash in mid-save, preemption signals, refusals."""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from token_shards import make_token_shards

from vqd_scale.train import checkpoint as C
from vqd_scale.train.metrics import read_metrics
from vqd_scale.train.signals import EXIT_PREEMPTED

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
BATCH = 8


@pytest.fixture(scope="session")
def tokens(tmp_path_factory):
    """Real token shards: synthetic img2dataset tars → k-means tokenizer → vqd-extract (in-process)."""
    return make_token_shards(tmp_path_factory.mktemp("train_data"), num_shards=2, per_shard=64)


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _args(tokens: Path, run_dir: Path, steps: int, world: int, *extra: str) -> list[str]:
    return [str(REPO / "configs" / "tiny.yaml"), f"run_dir={run_dir}",
            f'data.sources=[{{name: synthetic, shards: "{tokens}/{{00000..00001}}.tar"}}]',
            f"data.manifest={tokens}/manifest.json", f"data.batch_size={BATCH}", "model.height=4", "model.width=4",
            f"max_samples={steps * BATCH * world}", "logging.every_steps=1", "checkpoint.every_steps=4",
            "optim.warmup_samples=32", "optim.lr=2e-3", "logging.wandb_mode=disabled", *extra]


def _env(**extra) -> dict:
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore::FutureWarning",
               WANDB_MODE="disabled", **{k: str(v) for k, v in extra.items()})
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS"):
        env.pop(k, None)
    return env


def train(tokens, run_dir, steps, world=2, extra=(), env=None, check=True) -> subprocess.CompletedProcess:
    """`vqd-train` under torchrun (world > 1) or as one plain process."""
    if world > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={world}",
               f"--master_port={_port()}", "--module", "vqd_scale.cli.train"]
    else:
        cmd = [sys.executable, "-m", "vqd_scale.cli.train"]
    r = subprocess.run(cmd + _args(tokens, run_dir, steps, world, *extra), capture_output=True, text=True,
                       timeout=600, cwd=REPO, env=env or _env())
    if check:
        assert r.returncode == 0, r.stderr[-4000:]
    return r


def _losses(run_dir) -> list[float]:
    m = read_metrics(run_dir)
    return [m[s]["loss"] for s in sorted(m)]


def _learned(run_dir) -> None:
    """The x0 cross-entropy and the importance-weighted loss fall from the first to the last steps."""
    m = read_metrics(run_dir)
    steps = sorted(m)
    first, last = steps[:3], steps[-3:]
    aux0, aux1 = (sum(m[s]["aux"] for s in ss) / 3 for ss in (first, last))
    loss0, loss1 = (sum(m[s]["loss"] for s in ss) / 3 for ss in (first, last))
    assert aux1 < aux0 - 0.3, (aux0, aux1)
    assert loss1 < loss0, (loss0, loss1)


@pytest.fixture(scope="session")
def zero2_run(tokens, tmp_path_factory):
    run = tmp_path_factory.mktemp("zero2") / "run"
    train(tokens, run, steps=12, extra=["deepspeed.zero_stage=2"])
    return run


def test_zero2_two_ranks_learns_and_writes_run_dir(zero2_run):
    _learned(zero2_run)
    assert [s for s, _ in C.list_complete(zero2_run)] == [8, 12]  # keep_last=2 pruned step 4
    assert (zero2_run / "checkpoints" / "latest").read_text().strip() == "step_00000012"
    assert (zero2_run / "DONE").exists() and (zero2_run / "text_encoder.safetensors").exists()
    info = json.loads((zero2_run / "checkpoints" / "step_00000012" / "complete.json").read_text())
    assert info["world_size"] == 2 and info["samples_seen"] == 12 * BATCH * 2
    ema, raw = (C.load_weights(zero2_run / "checkpoints" / "step_00000012", w) for w in ("ema", "model"))
    assert ema.keys() == raw.keys() and any(not torch.equal(ema[k], raw[k]) for k in ema)
    from vqd_scale.families import load_config
    from vqd_scale.models.transformer import VQDiffusionTransformer
    cfg = load_config(zero2_run / "config.yaml")
    assert cfg.model.num_classes > 0  # resolved from the manifest and saved
    VQDiffusionTransformer(cfg.model).load_state_dict(ema, strict=True)


def test_zero3_two_ranks_learns(tokens, tmp_path):
    run = tmp_path / "run"
    train(tokens, run, steps=12, extra=["deepspeed.zero_stage=3", "optim.ema_every=2"])
    _learned(run)
    ema = C.load_weights(run / "checkpoints" / "step_00000012", "ema")
    raw = C.load_weights(run / "checkpoints" / "step_00000012", "model")
    # EMA gathered under ZeRO-3 is a full tensor per weight and lags the raw weights.
    assert all(ema[k].shape == raw[k].shape for k in raw) and any(not torch.equal(ema[k], raw[k]) for k in raw)


def test_sigkill_mid_save_then_resume_is_bit_identical(tokens, zero2_run, tmp_path):
    run = tmp_path / "run"
    # Both ranks are SIGKILLed while saving step 8: shards written, complete.json not yet.
    killed = train(tokens, run, steps=12, extra=["deepspeed.zero_stage=2"],
                   env=_env(VQD_TEST_KILL_BEFORE_COMPLETE=8), check=False)
    assert killed.returncode != 0
    half = run / "checkpoints" / "step_00000008"
    assert list(half.glob("*optim_states.pt")) and not (half / "complete.json").exists()
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_00000004"
    assert [s for s, _ in C.list_complete(run)] == [4] and C.resolve_resume(run, "auto").name == "step_00000004"
    assert C.load_weights(run / "checkpoints" / "step_00000004", "model")
    with pytest.raises(FileNotFoundError, match="incomplete"):
        C.load_weights(half, "ema")
    train(tokens, run, steps=12, extra=["deepspeed.zero_stage=2", "--resume", "auto"])
    ref, got = _losses(zero2_run), _losses(run)
    assert len(ref) == len(got) == 12
    assert got == ref  # fp32 + gloo: bit-identical, including steps 5–8 recomputed after the resume
    assert (half / "complete.json").exists()  # the half-written step 8 was redone


def test_resume_refuses_other_model_size(tokens, zero2_run):
    r = train(tokens, zero2_run, steps=16, world=1, extra=["model.size=S"], check=False)
    assert r.returncode == 2 and "model.size: checkpoint 'debug' vs config 'S'" in r.stderr, r.stderr[-2000:]


def test_resume_on_other_world_size_warns_and_continues(tokens, zero2_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(zero2_run, run)
    r = train(tokens, run, steps=28, world=1)  # 12 steps × 2 ranks of samples done; 4 more on 1 rank
    assert "optimizer state is REBUILT" in r.stderr and "continues after the 192 samples seen" in r.stderr
    assert [s for s, _ in C.list_complete(run)][-1] == 16
    # the data goes on from the 192 samples seen (24 batches of 8 on one rank), then 4 steps: it used to restart
    # at the first batch (delivered 4), replaying the data from the start
    loader = C.load_rank_state(run / "checkpoints" / "step_00000016", 0)["loader"]
    assert loader["delivered"] == 24 + 4 and loader["world_size"] == 1


def _worker_pids(parent: int) -> dict[int, int]:
    """{rank: pid} of torchrun's worker processes (from their environment)."""
    out = {}
    for d in Path("/proc").iterdir():
        try:
            if d.name.isdigit() and int((d / "stat").read_text().split(") ")[1].split()[1]) == parent:
                env = dict(kv.split("=", 1) for kv in (d / "environ").read_text().split("\0") if "=" in kv)
                out[int(env["RANK"])] = int(d.name)
        except (OSError, KeyError, ValueError, IndexError):
            continue
    return out


def test_sigterm_on_one_rank_saves_on_all_and_exits_for_requeue(tokens, tmp_path):
    """Under torchrun too: plain torchrun exits 1 when workers exit 42 (and SIGTERMs the slower one), so the
    README's torchrun line goes through vqd_scale.launch.torchrun, whose exit code is the workers' 42."""
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "vqd_scale.launch.torchrun", "--nproc_per_node=2", f"--master_port={_port()}",
           "--module", "vqd_scale.cli.train", *_args(tokens, run, 10_000, 2, "checkpoint.every_steps=100000")]
    p = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 180
    while time.time() < deadline and not (run / "metrics.jsonl").exists():
        time.sleep(0.2)
    workers = _worker_pids(p.pid)
    assert set(workers) == {0, 1}, workers
    os.kill(workers[1], signal.SIGTERM)  # only rank 1 is told; rank 0 must agree through the all-reduce
    out, err = p.communicate(timeout=180)
    assert f"exiting with code {EXIT_PREEMPTED}" in out, err[-3000:]
    assert p.returncode == EXIT_PREEMPTED, err[-3000:]  # the requeue condition of a batch script
    done = C.list_complete(run)
    assert len(done) == 1 and done[0][0] == max(read_metrics(run))  # saved at the last completed step
    assert json.loads((done[0][1] / "complete.json").read_text())["world_size"] == 2


def _garble(path: Path, size: int = 4096) -> None:
    """Overwrite `size` bytes in the middle of a file (same size: only the hashes can tell)."""
    with open(path, "r+b") as f:
        f.seek(path.stat().st_size // 2)
        f.write(b"\x5a" * size)


def test_damaged_checkpoint_files_are_named_and_auto_resume_falls_back(zero2_run, tmp_path):
    """Each kind of damage is named by file; --resume auto skips to the older checkpoint with a warning."""
    run = tmp_path / "run"
    shutil.copytree(zero2_run, run)
    new, old = run / "checkpoints" / "step_00000012", run / "checkpoints" / "step_00000008"
    info = C.read_complete(new)
    assert set(info["files"]) >= {C.EMA_FILE, "mp_rank_00_model_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt",
                                  "rank_00001.pt", C.TRAINER_STATE}
    assert info["bytes"] == sum(f.stat().st_size for f in new.iterdir() if f.name != C.COMPLETE)
    for f, want in info["files"].items():  # an independent oracle: hashlib over the bytes on disk
        assert __import__("hashlib").sha256((new / f).read_bytes()).hexdigest() == want["sha256"]
    assert C.damaged_among(new, 0, 2) == C.damaged_among(new, 1, 2) == []

    ema = new / C.EMA_FILE
    ema.write_bytes(ema.read_bytes()[:1000])  # truncated
    with pytest.raises(C.CheckpointError, match=f"{ema} has 1000 bytes"):
        C.resolve_resume(run, str(new))
    with pytest.warns(UserWarning, match=f"{new} is damaged .*{C.EMA_FILE} has 1000 bytes"):
        assert C.resume_candidates(run, "auto") == [old]
    with pytest.raises(C.CheckpointError, match=f"{ema} has 1000 bytes"):  # readers (eval, sample) too
        C.load_weights(new, "ema")
    shutil.copy(zero2_run / "checkpoints" / "step_00000012" / C.EMA_FILE, ema)

    (new / "mp_rank_00_model_states.pt").unlink()  # deleted model states
    with pytest.raises(C.CheckpointError, match="mp_rank_00_model_states.pt is missing"):
        C.resume_candidates(run, str(new))
    shutil.copy(zero2_run / "checkpoints" / "step_00000012" / "mp_rank_00_model_states.pt", new)

    for name in ("zero_pp_rank_1_mp_rank_00_optim_states.pt", "rank_00001.pt"):  # truncated shard / rank state
        (new / name).write_bytes((new / name).read_bytes()[:-100])
        with pytest.raises(C.CheckpointError, match=f"{name} has .* bytes, .* were written"):
            C.resume_candidates(run, str(new))
        shutil.copy(zero2_run / "checkpoints" / "step_00000012" / name, new)

    _garble(new / "rank_00001.pt")  # same size: the hash check of the rank that owns it in the split names it
    assert C.resume_candidates(run, str(new)) == [new]
    assert C.damaged_among(new, 0, 2) + C.damaged_among(new, 1, 2) == [
        f"{new / 'rank_00001.pt'} does not match its SHA-256 in complete.json (damaged bytes)"]
    with pytest.raises(C.CheckpointError, match="rank_00001.pt is unreadable"):  # a reader without the check
        C.load_rank_state(new, 1)
    shutil.copy(zero2_run / "checkpoints" / "step_00000012" / "rank_00001.pt", new)

    (new / C.COMPLETE).write_text('{"step": 12, "files": {')  # garbled complete.json
    with pytest.raises(C.CheckpointError, match=f"{new / C.COMPLETE} is damaged"):
        C.resume_candidates(run, str(new))
    with pytest.warns(UserWarning, match="complete.json is damaged"):
        assert C.resume_candidates(run, "auto") == [old]
    (old / "trainer_state.pt").unlink()
    with pytest.raises(C.CheckpointError, match="every checkpoint .* is damaged"), pytest.warns(UserWarning):
        C.resume_candidates(run, "auto")


def test_auto_resume_sets_aside_every_newer_damaged_checkpoint(zero2_run, tmp_path):
    """A newer checkpoint skipped for a truncated file is renamed too (it used to stay the newest 'complete' one,
    counted by keep_last and warned about on every resume), and `latest` names the one resumed from."""
    from types import SimpleNamespace

    from vqd_scale.distributed import DistEnv
    from vqd_scale.train import run_dir as R
    run = tmp_path / "run"
    shutil.copytree(zero2_run, run)
    new = run / "checkpoints" / "step_00000012"
    (new / "rank_00001.pt").write_bytes(b"")
    with pytest.warns(UserWarning, match="rank_00001.pt has 0 bytes"):
        candidates = C.resume_candidates(run, "auto")
    task = SimpleNamespace(model_config=C.read_complete(candidates[0])["model"])
    assert R.verified_resume(candidates, "auto", DistEnv(), task, run).name == "step_00000008"
    assert [s for s, _ in C.list_complete(run)] == [8] and (run / "checkpoints" / "step_00000012.damaged").is_dir()
    assert C.latest_name(run) == "step_00000008"
