"""End-to-end CPU demo: synthetic img2dataset shards → tokenizer → vqd-extract → vqd-train → samples + metric.

    python tools/demo.py [--out runs/demo] [--max-samples 80000] [--corgi]

Every stage is the real command a user runs at scale (same CLIs, same files); only sizes are tiny.
Prints the sample-grid path (each sample with its caption and the held-out real image beside it) and
the attribute accuracy of the samples (the synthetic attribute classifier on decoded images vs their
captions), next to the same classifier on shuffled caption/image pairs (chance) and on the held-out
real images through the tokenizer (the ceiling the tokenizer allows). `bench/quality.py` reuses the
stages below to compare training settings at this size. `--corgi` adds a second stage (tools/demo_corgi.py):
text → shifted prior → CLIP image embedding → language-free decoder, scored beside the text-conditioned model.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RES, PATCH = 32, 8  # 32×32 images, 4×4 = 16 tokens per image
SHARDS = 4
HELDOUT = 256  # held-out captions scored (the grid shows the first GRID of them)
GRID = 48
# The demo recipe on top of configs/tiny.yaml (tuned with bench/quality.py; docs/results.md).
RECIPE = [f"model.height={RES // PATCH}", f"model.width={RES // PATCH}", "model.layers=4", "model.dim=128", "model.heads=4",
          "data.batch_size=32", "optim.lr=2e-3", "optim.warmup_samples=640", "optim.ema_every=1",
          "checkpoint.every_steps=500", "logging.every_steps=25"]
# VQ-Diffusion's truncation sampling without guidance (the official v1 inference); r = 0.7 from the bench
SAMPLER = dict(steps=50, guidance_scale=1.0, truncation_rate=0.7, batch_size=64)


def sh(*cmd: str, quiet: bool = False) -> None:
    """Run a stage as its own process, as a user would; stop the demo if it fails."""
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=REPO, check=True, stdout=subprocess.DEVNULL if quiet else None)


def stage(name: str, t0: float) -> None:
    print(f"== {name} ({time.time() - t0:.0f}s elapsed)", flush=True)


def quiet_env() -> None:
    """Environment every stage runs in: CPU DeepSpeed, offline hubs and wandb, one thread."""
    # One thread: tiny models gain little from more, and on a shared box OpenMP spinning makes them 10-30x slower.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_SILENT", "true")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("PYTHONWARNINGS", "ignore::FutureWarning")
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache/vqd_scale/torch_extensions"))


def prepare_data(out: Path, per_shard: int = 512, t0: float = 0.0) -> None:
    """Stages 1–3: synthetic img2dataset shards, the k-means tokenizer, token extraction (skipped when done)."""
    py, last = sys.executable, f"{SHARDS - 1:05d}"
    if (out / "tokens" / "manifest.json").exists():
        print(f"== data: reusing {out / 'tokens'}", flush=True)
        return
    stage("1/5 synthetic img2dataset shards", t0)
    sh(py, "tools/make_synthetic.py", "--out", str(out / "raw"), "--shards", str(SHARDS),
       "--per-shard", str(per_shard), "--resolution", str(RES))
    stage("2/5 image tokenizer (patch k-means + pruning map)", t0)
    sh(py, "tools/fit_tokenizer.py", "--out", str(out / "tokenizer"), "--resolution", str(RES),
       "--patch", str(PATCH), "--codes", "256", "--images", "2000", "--two-object-prob", "0")
    stage("3/5 token extraction (vqd-extract)", t0)
    sh(py, "-m", "vqd_scale.cli.extract", "--inputs", str(out / "raw" / f"{{00000..{last}}}.tar"),
       "--out-dir", str(out / "tokens"), "--tokenizer", str(out / "tokenizer"), "--resolution", str(RES),
       "--source", "synthetic", "--no-progress")


def train(data: Path, run_dir: Path, max_samples: int, overrides: list[str] = (), quiet: bool = False) -> None:
    """Stage 4: `vqd-train configs/tiny.yaml` + the demo recipe (+ overrides), one process, resumable."""
    last = f"{SHARDS - 1:05d}"
    sh(sys.executable, "-m", "vqd_scale.cli.train", "configs/tiny.yaml", f"run_dir={run_dir}",
       f'data.sources=[{{name: synthetic, shards: "{data}/tokens/{{00000..{last}}}.tar"}}]',
       f"data.manifest={data / 'tokens' / 'manifest.json'}", f"max_samples={max_samples}",
       *RECIPE, *overrides, "--resume", "auto", quiet=quiet)


def load_run(run_dir: Path):
    """(cfg, EMA model, text tower, diffusion, step) of the newest complete checkpoint of a run."""
    from vqd_scale.cli import text_encoder_for
    from vqd_scale.families import load_config
    from vqd_scale.diffusion.discrete import MaskAndReplace
    from vqd_scale.models.transformer import VQDiffusionTransformer
    from vqd_scale.rundir import list_complete, load_weights

    cfg = load_config(run_dir / "config.yaml")
    step, ckpt = list_complete(run_dir)[-1]
    model = VQDiffusionTransformer(cfg.model)
    model.load_state_dict(load_weights(ckpt, "ema"))
    text = text_encoder_for(cfg.text, run_dir / "config.yaml")  # the run's random-init tower
    return cfg, model.eval(), text, MaskAndReplace(cfg.diffusion, cfg.model.num_classes), step


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/demo")
    ap.add_argument("--max-samples", type=int, default=80000, help="training samples (the main time knob)")
    ap.add_argument("--per-shard", type=int, default=512)
    ap.add_argument("--corgi", action="store_true", help="then the Corgi chain stage (tools/demo_corgi.py)")
    ap.add_argument("--corgi-samples", type=int, default=40000, help="language-free decoder training samples")
    ap.add_argument("--corgi-prior-samples", type=int, default=20000, help="shifted prior training samples")
    a = ap.parse_args(argv)
    quiet_env()
    out = (REPO / a.out).resolve() if not Path(a.out).is_absolute() else Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    prepare_data(out, a.per_shard, t0)
    stage("4/5 training (vqd-train configs/tiny.yaml, one process)", t0)
    train(out, out / "run", a.max_samples)
    stage("5/5 sampling (50 steps, truncation 0.7) and attribute accuracy", t0)
    from vqd_scale.config import SamplerConfig
    from vqd_scale.eval.plots import save_grid
    from vqd_scale.eval.quality import sample_accuracy, synthetic_heldout, to_unit
    from vqd_scale.models.vqvae import ImageTokenizer

    cfg, model, text, diffusion, step = load_run(out / "run")
    tok = ImageTokenizer.load(out / "tokenizer")
    held = synthetic_heldout(HELDOUT, RES)  # another seed: captions/images never trained on
    res = sample_accuracy(model, text, diffusion, tok, held, SamplerConfig(**SAMPLER))
    real_recon = tok.decode(tok.encode(to_unit(held.images)))  # what the tokenizer lets a model reach
    from vqd_scale.data.synthetic import attribute_accuracy
    ceiling = attribute_accuracy(held.captions, real_recon)
    png = save_grid(res["images"][:GRID], out / "samples.png", captions=held.captions[:GRID],
                    references=real_recon[:GRID], scale=4, cols=8, pad=6)
    wall = time.time() - t0
    print(f"\nsample grid ({GRID} of {HELDOUT} held-out captions, checkpoint step {step}; each sample with "
          f"the held-out real image through the tokenizer beside it): {png}")
    for k in ("color", "shape", "position", "count", "all"):
        print(f"  {k:>8}: samples {res['samples'][k]:.2f} | shuffled captions (chance) {res['chance'][k]:.2f}"
              f" | real images through the tokenizer {ceiling[k]:.2f}")
    print(f"attribute accuracy (all attributes right): {res['samples']['all']:.2f} vs chance "
          f"{res['chance']['all']:.2f} (ceiling {ceiling['all']:.2f}); demo wall time {wall:.0f}s")
    if a.corgi:
        import demo_corgi  # tools/, beside this file (sys.path[0] when run as a script)

        print()
        demo_corgi.run(out, res["samples"], t0, a.corgi_samples, a.corgi_prior_samples)
        print(f"demo wall time with the Corgi stage {time.time() - t0:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
