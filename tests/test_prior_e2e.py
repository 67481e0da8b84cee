"""The tiny shifted prior end to end: fit clusters on token shards → vqd-train (real DeepSpeed, gloo) → vqd-eval."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from vqd_scale.data.random_shards import write_random_token_shards
from vqd_scale.train import checkpoint as C
from vqd_scale.train.metrics import read_metrics

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))
import fit_prior_clusters  # noqa: E402

pytestmark = pytest.mark.slow
BATCH, STEPS = 8, 12


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore::FutureWarning",
               WANDB_MODE="disabled", MASTER_PORT=str(_port()))  # other suites may hold the default 29500
    for k in ("SLURM_PROCID", "SLURM_NTASKS"):
        env.pop(k, None)
    # one rank, declared explicitly, on the free port above: another suite may hold 29500
    env.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
    return env


def _give_embeddings_a_direction(paths) -> None:
    """Image embeddings normalise(m + 0.3·noise) for one fixed m: something a prior can learn in 12 steps
    (random unit vectors have none: their mean is 0 and the prior sees only directions)."""
    import numpy as np
    import webdataset as wds
    from vqd_scale.data import schema
    m = np.random.default_rng(7).standard_normal(32)
    for path in paths:
        recs = list(wds.WebDataset(str(path), shardshuffle=False, empty_check=False))
        with schema.tar_writer(path) as sink:
            for r in recs:
                e = m / np.linalg.norm(m) + 0.3 * schema.load_npy(r[schema.IMAGE_EMB]).astype(np.float64) / 32 ** 0.5
                r[schema.IMAGE_EMB] = schema.npy_bytes((e / np.linalg.norm(e)).astype(np.float16))
                sink.write({k: v for k, v in r.items() if not k.startswith("__") or k == "__key__"})


def test_tiny_prior_trains_and_evaluates(tmp_path):
    data = tmp_path / "tok"
    _give_embeddings_a_direction(write_random_token_shards(data, 2, 32, (4, 4), 16, embed_dim=32, seed=0))
    shards = f"{data}/{{00000..00001}}.tar"
    clusters = tmp_path / "clusters.safetensors"
    fit_prior_clusters.main(["--shards", shards, "--manifest", str(data / "manifest.json"), "--k", "4",
                             "--out", str(clusters)])
    run = tmp_path / "run"
    common = [f"run_dir={run}", f'data.sources=[{{name: synthetic, shards: "{shards}"}}]',
              f"data.manifest={data}/manifest.json", f"shifted.clusters={clusters}", f"eval.shards={shards}",
              "eval.num_samples=8", "eval.prior_steps=[8,64]", "logging.wandb_mode=disabled"]
    def train(steps):
        r = subprocess.run([sys.executable, "-m", "vqd_scale.cli.train", str(REPO / "configs" / "tiny_prior.yaml"),
                            *common, f"data.batch_size={BATCH}", f"max_samples={steps * BATCH}",
                            "logging.every_steps=1", "checkpoint.every_steps=6", "optim.warmup_samples=16",
                            "optim.lr=3e-3", "--resume", "auto"],
                           capture_output=True, text=True, timeout=600, cwd=REPO, env=_env())
        assert r.returncode == 0, r.stderr[-4000:]

    train(STEPS)
    m = read_metrics(run)
    steps = sorted(m)
    assert steps[-1] == STEPS and {"loss", "mse", "cos_x0"} <= set(m[steps[-1]])
    first, last = (sum(m[s]["mse"] for s in ss) / 3 for ss in (steps[:3], steps[-3:]))
    assert last < 0.5 * first, (first, last)  # the prior learns the embeddings' common direction
    assert [s for s, _ in C.list_complete(run)] == [6, 12]
    # the model evaluated from the run's config carries the fitted mixture (not zeros / unit stds)
    import torch
    from vqd_scale.families import load_config
    from vqd_scale.data.clusters import load_clusters
    from vqd_scale.families import build_task
    ema = C.load_weights(run / "checkpoints" / "step_00000012", "ema")
    module = build_task(load_config(run / "config.yaml"), torch.device("cpu")).module
    module.load_state_dict(ema)  # strict: the mixture is part of the EMA weights
    fitted = load_clusters(clusters)  # on the unit sphere; the prior's space is z = √E·e
    assert (module.mixture.base_means - fitted["means"] * 32 ** 0.5).abs().max() < 1e-5
    assert (module.mixture.stds() - fitted["stds"] * 32 ** 0.5).abs().max() < 1e-5
    train(STEPS + 2)  # resumes from step 12 (same prior config) and goes on
    assert max(read_metrics(run)) == STEPS + 2 and [s for s, _ in C.list_complete(run)][-1] == STEPS + 2
    from vqd_scale.cli.eval import main as vqd_eval  # in-process: saves a second interpreter start
    assert vqd_eval([str(run), "--once", "--step", "12", "eval.num_samples=8", "eval.prior_steps=[8,64]"]) in (0, None)
    res = json.loads((run / "eval" / "12.json").read_text())
    metrics = res["metrics"] if "metrics" in res else res
    keys = [k for k in metrics if "8" in k and "sim_pred_image" in k]
    assert keys and all(-1 <= metrics[k] <= 1 for k in keys), metrics
    assert any("@64" in k for k in metrics)
