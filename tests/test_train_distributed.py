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

import numpy as np
import pytest
import torch

from vqd_scale.train import checkpoint as C
from vqd_scale.train.metrics import read_metrics
from vqd_scale.train.signals import EXIT_PREEMPTED

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
BATCH = 8


@pytest.fixture(scope="session")
def tokens(tmp_path_factory):
    """Real token shards: synthetic img2dataset tars → k-means tokenizer → vqd-extract (in-process)."""
    from vqd_scale.cli.extract import main as extract
    from vqd_scale.data.synthetic import SyntheticSpec, make_sample, write_shards
    from vqd_scale.models.vqvae import KMeansTokenizer

    root = tmp_path_factory.mktemp("train_data")
    spec = SyntheticSpec(num_shards=2, samples_per_shard=64, resolution=32, seed=0)
    write_shards(root / "raw", spec)
    torch.manual_seed(0)
    imgs = np.stack([np.array(make_sample(spec, 99, i)[0]) for i in range(64)])  # [64,32,32,3] uint8
    imgs = torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 127.5 - 1  # [64,3,32,32] in [-1,1]
    KMeansTokenizer.fit(imgs, patch=8, num_codes=32, seed=0).save(root / "tok")  # 4×4 tokens
    assert extract(["--inputs", str(root / "raw" / "{00000..00001}.tar"), "--out-dir", str(root / "tok_shards"),
                    "--tokenizer", str(root / "tok"), "--resolution", "32", "--no-progress"]) in (0, None)
    return root / "tok_shards"


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
    from vqd_scale.config import load_config
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
    assert "optimizer state is REBUILT" in r.stderr
    assert [s for s, _ in C.list_complete(run)][-1] == 16


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
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_port()}",
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
    done = C.list_complete(run)
    assert len(done) == 1 and done[0][0] == max(read_metrics(run))  # saved at the last completed step
    assert json.loads((done[0][1] / "complete.json").read_text())["world_size"] == 2
