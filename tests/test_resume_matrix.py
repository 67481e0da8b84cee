"""Exact resume across ZeRO stages, gradient accumulation, loader workers and shard sampling (EMA on), and the
resume paths that must be exact or refused: a damaged newest checkpoint, a damaged named one, a divergence.

Rows: a pairwise-covering subset of stage {1,2,3} × grad_accum {1,2} × workers {0,2} × resampled {true,false}:
every pair of values of any two factors occurs in some row (6 rows instead of 24); a resume bug that needs one
particular combination of three factors would slip through, one that needs two cannot. Each row trains 8 steps
uninterrupted (checkpoints at 4 and 8), then resumes from its step 4 in a fresh run directory; losses of steps
5–8 and the final EMA and raw weights must be bit-identical (fp32, gloo). Resuming at step 4 with EMA every 2
steps is what crashed ZeRO-3 (the first EMA gather after load_checkpoint broke the prefetch trace at step 7).
Virtual epochs of 48 samples are shorter than a 32-sample shard per stream, so positions cross epochs.
All runs share one 2-rank torchrun launch (tests/resume_worker.py): starting DeepSpeed per run would cost more
than the runs.
"""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vqd_scale.data.random_shards import write_random_token_shards
from vqd_scale.train import checkpoint as C
from vqd_scale.train.loop import EXIT_NONFINITE
from vqd_scale.train.metrics import read_metrics

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
BATCH, WORLD, STEPS = 4, 2, 8
# (zero stage, grad accum, loader workers, resampled): all pairs of any two factors are covered
ROWS = [(1, 1, 0, True), (1, 2, 2, False), (2, 1, 2, False), (2, 2, 0, True), (3, 1, 0, False), (3, 2, 2, True)]
NAMES = [f"z{s}_accum{a}_workers{w}_{'resampled' if r else 'split'}" for s, a, w, r in ROWS]


def _overrides(data: Path, run_dir: Path, stage=2, accum=1, workers=0, resampled=True, *extra) -> list[str]:
    return [f"run_dir={run_dir}", f'data.sources=[{{name: rand, shards: "{data}/{{00000..00003}}.tar"}}]',
            f"data.manifest={data}/manifest.json",
            f"data.batch_size={BATCH}", f"data.num_workers={workers}", f"data.resampled={str(resampled).lower()}",
            "data.epoch_samples=48", "data.shuffle_buffer=8", "model.height=4", "model.width=4",
            f"deepspeed.zero_stage={stage}", f"deepspeed.grad_accum={accum}",
            f"max_samples={STEPS * BATCH * WORLD * accum}", "logging.every_steps=1", "checkpoint.every_steps=4",
            "checkpoint.keep_last=3", "optim.ema_every=2", "optim.warmup_samples=16", "optim.lr=2e-3",
            "logging.wandb_mode=disabled", *extra]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ckpt(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / C.ckpt_name(step)


@pytest.fixture(scope="module")
def matrix(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume_matrix")
    data = root / "data"
    write_random_token_shards(data, 4, 32, (4, 4), 32, seed=5)
    runs, ref = [], {}
    for name, row in zip(NAMES, ROWS):
        ref[name] = root / f"ref_{name}"
        runs.append({"name": f"ref_{name}", "overrides": _overrides(data, ref[name], *row), "resume": "none"})
    for name, row in zip(NAMES, ROWS):
        runs.append({"name": f"resumed_{name}", "overrides": _overrides(data, root / f"resumed_{name}", *row),
                     "resume": str(_ckpt(ref[name], 4))})
    # 4 KiB of garbage in the newest checkpoint's EMA: --resume auto sets it aside and redoes steps 5–8
    fallback = root / "fallback"
    runs.append({"name": "fallback", "overrides": _overrides(data, fallback, *ROWS[5]), "resume": "auto",
                 "prepare": {"copy": [str(ref[NAMES[5]]), str(fallback)],
                             "overwrite": str(_ckpt(fallback, 8) / C.EMA_FILE)}})
    # the same kind of damage in an optimizer shard of a checkpoint named on the command line: refused by name
    named = root / "named"
    runs.append({"name": "named", "overrides": _overrides(data, named, *ROWS[4]), "resume": str(_ckpt(named, 8)),
                 "prepare": {"copy": [str(ref[NAMES[4]]), str(named)],
                             "overwrite": str(_ckpt(named, 8) / "zero_pp_rank_1_mp_rank_00_optim_states.pt")}})
    # a learning rate of 1e30 overflows the weights within two steps: stop, keep the last finite checkpoint
    diverged = root / "diverged"
    runs.append({"name": "diverged", "resume": "none", "overrides": _overrides(
        data, diverged, 2, 1, 0, True, "optim.lr=1e30", "optim.warmup_samples=0", "checkpoint.every_steps=1")})
    spec = root / "spec.json"
    spec.write_text(json.dumps({"runs": runs, "results": str(root / "results.json")}))
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", WANDB_MODE="disabled",
               PYTHONWARNINGS="ignore::FutureWarning", PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS", "MASTER_PORT"):
        env.pop(k, None)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={WORLD}", f"--master_port={_port()}",
                        str(REPO / "tests" / "resume_worker.py"), str(spec)], capture_output=True, text=True,
                       timeout=800, cwd=REPO, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    return {"results": json.loads((root / "results.json").read_text()), "ref": ref, "root": root}


def _same_run(ref: Path, got: Path, steps) -> None:
    a, b = read_metrics(ref), read_metrics(got)
    assert [b[s]["loss"] for s in steps] == [a[s]["loss"] for s in steps]
    for which in ("ema", "model"):
        wa, wb = C.load_weights(_ckpt(ref, STEPS), which), C.load_weights(_ckpt(got, STEPS), which)
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), which


@pytest.mark.parametrize("name", NAMES)
def test_resume_is_bit_exact(matrix, name):
    res = matrix["results"]
    assert res[f"ref_{name}"]["code"] == 0 and res[f"resumed_{name}"]["code"] == 0, (res[f"ref_{name}"], res[f"resumed_{name}"])
    resumed = matrix["root"] / f"resumed_{name}"
    assert sorted(read_metrics(resumed)) == [5, 6, 7, 8]  # it really started at step 4
    _same_run(matrix["ref"][name], resumed, range(5, STEPS + 1))


def test_damaged_newest_checkpoint_is_set_aside_and_the_previous_one_resumes_exactly(matrix):
    res, run = matrix["results"]["fallback"], matrix["root"] / "fallback"
    assert res["code"] == 0, res
    warned = " ".join(res["warnings"])
    assert f"{_ckpt(run, 8) / C.EMA_FILE} does not match its SHA-256" in warned and "set aside" in warned
    assert (run / "checkpoints" / ("step_00000008" + C.DAMAGED_SUFFIX)).is_dir()
    _same_run(matrix["ref"][NAMES[5]], run, range(1, STEPS + 1))


def test_damaged_named_checkpoint_is_refused_naming_the_file(matrix):
    res = matrix["results"]["named"]
    assert res["code"] == 2 and "zero_pp_rank_1_mp_rank_00_optim_states.pt does not match its SHA-256" in res["error"]
    assert (matrix["root"] / "named" / "checkpoints" / "step_00000008").is_dir()  # refused, not moved


def test_nonfinite_loss_stops_without_saving_that_step(matrix):
    res, run = matrix["results"]["diverged"], matrix["root"] / "diverged"
    assert res["code"] == EXIT_NONFINITE, res
    m = read_metrics(run)
    last = max(m)
    assert not all(map(lambda v: v == v and abs(v) != float("inf"), (m[last]["loss"], m[last]["grad_norm"])))
    steps = [s for s, _ in C.list_complete(run)]
    assert steps and steps[-1] == last - 1 and (run / "checkpoints" / "latest").read_text().strip() == C.ckpt_name(last - 1)
    good = C.load_weights(_ckpt(run, last - 1), "model")
    assert all(torch.isfinite(v).all() for v in good.values()) and not (run / "DONE").exists()
