"""`vqd-train --init-from` end to end: a diffusers-format VQ-Diffusion directory, imported with
`vqd-export import`, starts a real (plain-process, DeepSpeed gloo) run; an imported official `.pth` of
another size is refused with the setting to change."""
import dataclasses
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vqd_scale.compat import import_diffusers
from vqd_scale.config import TransformerConfig
from vqd_scale.data.random_shards import write_random_token_shards
from vqd_scale.interop.diffusers import split_null, to_diffusers
from vqd_scale.models.transformer import VQDiffusionTransformer
from vqd_scale.train import checkpoint as C
from vqd_scale.distributed import DEFAULT_PORT

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
K, GRID, BATCH = 16, 4, 8
# The tiny training config's model (configs/tiny.yaml: size debug, context 64 = tiny text width) on 4×4 tokens.
MODEL = TransformerConfig(size="debug", num_classes=K, height=GRID, width=GRID, context_dim=64, num_timesteps=100)


def _write_diffusers_dir(out: Path) -> dict[str, torch.Tensor]:
    """A diffusers VQ-Diffusion directory (transformer + learned null text) as the hub lays it out."""
    diffusers = import_diffusers()  # before any diffusers submodule: they import torchvision
    from diffusers.pipelines.deprecated.vq_diffusion.pipeline_vq_diffusion import LearnedClassifierFreeSamplingEmbeddings
    torch.manual_seed(123)  # not the run's seed: a run that ignored --init-from would hold other weights
    model = VQDiffusionTransformer(MODEL)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))  # no exact zeros / ones left from init
    conf, dsd = to_diffusers(model.state_dict(), MODEL)
    transformer = diffusers.Transformer2DModel(**conf)
    tsd, null = split_null(dsd)
    transformer.load_state_dict(tsd, strict=True)
    transformer.save_pretrained(str(out / "transformer"), safe_serialization=True)
    learned = LearnedClassifierFreeSamplingEmbeddings(learnable=True, hidden_size=null.shape[1], length=null.shape[0])
    learned.embeddings.data.copy_(null)
    learned.save_pretrained(str(out / "learned_classifier_free_sampling_embeddings"))
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _env() -> dict:
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore::FutureWarning",
               WANDB_MODE="disabled")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID", "SLURM_NTASKS"):
        env.pop(k, None)  # one plain process, as a user would start it: it must find a free port itself
    return env


def _train(data: Path, run: Path, init_from: Path, *extra: str) -> subprocess.CompletedProcess:
    args = [str(REPO / "configs" / "tiny.yaml"), f"run_dir={run}",
            f'data.sources=[{{name: random, shards: "{data}/{{00000..00001}}.tar"}}]', f"data.manifest={data}/manifest.json",
            f"data.batch_size={BATCH}", f"model.height={GRID}", f"model.width={GRID}", f"max_samples={2 * BATCH}",
            "logging.every_steps=1", "logging.wandb_mode=disabled",
            # Keep the weights still: the EMA is only folded every 1000 steps (so after 2 steps it is the start),
            # no decoupled weight decay, and an lr so small that Adam's step (≈ lr) vanishes next to the weights.
            "optim.ema_every=1000", "optim.weight_decay=0", "optim.lr=1e-9", "optim.warmup_samples=0",
            *extra, "--init-from", str(init_from)]
    return subprocess.run([sys.executable, "-m", "vqd_scale.cli.train", *args], capture_output=True, text=True,
                          timeout=300, cwd=REPO, env=_env())


def test_imported_diffusers_dir_initialises_training(tmp_path):
    data = tmp_path / "tok"
    write_random_token_shards(data, 2, 16, (GRID, GRID), K, seed=0)
    ref = _write_diffusers_dir(tmp_path / "hub")
    w = tmp_path / "imported" / "w.safetensors"
    r = subprocess.run([sys.executable, "-m", "vqd_scale.cli.export", "import", str(tmp_path / "hub"), "--out", str(w)],
                       capture_output=True, text=True, timeout=300, cwd=REPO, env=_env())
    assert r.returncode == 0, r.stderr[-3000:]
    imported = load_file(str(w))
    assert imported.keys() == ref.keys() and all(torch.equal(imported[k], ref[k]) for k in ref)

    run = tmp_path / "run"
    with socket.socket() as held:
        try:  # the old fixed port of plain runs is taken (by us or by someone else): the run must not need it
            held.bind(("127.0.0.1", DEFAULT_PORT))
            held.listen()
        except OSError:
            pass
        r = _train(data, run, w)
    assert r.returncode == 0, r.stderr[-4000:]
    (step, ckpt), = C.list_complete(run)
    assert step == 2
    ema = C.load_weights(ckpt, "ema")
    assert ema.keys() == ref.keys() and all(torch.equal(ema[k], ref[k]) for k in ref), \
        [k for k in ref if not torch.equal(ema[k], ref[k])][:5]
    raw = C.load_weights(ckpt, "model")  # the engine trained from the imported weights (2 steps of lr 1e-9)
    assert all(torch.allclose(raw[k], ref[k], rtol=0, atol=1e-6) for k in ref)

    # An official .pth of another size (width 32), imported the same way: refused before any process group
    # or run directory exists, naming the setting that would make the run fit those weights.
    from tests.test_interop import _official_keys
    from vqd_scale.cli.export import main as vqd_export
    torch.manual_seed(1)
    narrow = VQDiffusionTransformer(dataclasses.replace(MODEL, dim=32)).state_dict()
    torch.save({"model": _official_keys(narrow)}, tmp_path / "official.pth")
    w32 = tmp_path / "imported" / "official.safetensors"
    assert vqd_export(["import", str(tmp_path / "official.pth"), "--out", str(w32), "--heads", "2"]) == 0
    other = tmp_path / "run_other"
    r = _train(data, other, w32)
    assert r.returncode == 2, r.stderr[-3000:]
    assert "--init-from" in r.stderr and "set model.dim=32 " in r.stderr, r.stderr[-3000:]
    assert not other.exists()
