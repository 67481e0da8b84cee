"""End-to-end CPU demo: synthetic img2dataset shards → tokenizer → vqd-extract → vqd-train → samples + metric.

    python tools/demo.py [--out runs/demo] [--max-samples 80000]

Every stage is the real command a user runs at scale (same CLIs, same files); only sizes are tiny.
Prints the sample-grid path and the conditional accuracy of the samples (C's synthetic attribute
classifier on decoded images vs their captions), next to the same classifier on shuffled
caption/image pairs (chance level) and on real held-out images (the ceiling the tokenizer allows).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
RES, PATCH = 32, 8  # 32×32 images, 4×4 = 16 tokens per image (recon keeps 98% of attributes)


def sh(*cmd: str) -> None:
    """Run a stage as its own process, as a user would; stop the demo if it fails."""
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=REPO, check=True)


def stage(name: str, t0: float) -> None:
    print(f"== {name} ({time.time() - t0:.0f}s elapsed)", flush=True)


def sample_and_score(run_dir: Path, tok_dir: Path, captions: list[str], real: np.ndarray, out_png: Path,
                     sampler=None) -> dict:
    """Generate one image per caption from the newest checkpoint (EMA weights), save a grid, score it."""
    import torch
    from PIL import Image

    from vqd_scale.cli import text_encoder_for
    from vqd_scale.config import SamplerConfig, load_config
    from vqd_scale.data.synthetic import attribute_accuracy
    from vqd_scale.diffusion.discrete import MaskAndReplace
    from vqd_scale.generate import generate
    from vqd_scale.models.transformer import VQDiffusionTransformer
    from vqd_scale.models.vqvae import ImageTokenizer
    from vqd_scale.train.checkpoint import list_complete, load_weights

    cfg = load_config(run_dir / "config.yaml")
    step, ckpt = list_complete(run_dir)[-1]
    model = VQDiffusionTransformer(cfg.model)
    model.load_state_dict(load_weights(ckpt, "ema"))
    text = text_encoder_for(cfg.text, run_dir / "config.yaml")  # the run's random-init tower
    diffusion = MaskAndReplace(cfg.diffusion, cfg.model.num_classes)
    tok = ImageTokenizer.load(tok_dir)
    gen = torch.Generator().manual_seed(0)
    sampler = sampler or SamplerConfig(steps=50, guidance_scale=3.0, truncation_rate=1.0, batch_size=32)
    ids = generate(model, text, diffusion, text.tokenize(captions), sampler, generator=gen)
    images = tok.decode(ids.view(-1, cfg.model.height, cfg.model.width))  # [B,3,H,W] in [-1,1]
    u8 = ((images.permute(0, 2, 3, 1).numpy() + 1) * 127.5).round().clip(0, 255).astype(np.uint8)
    cols = 8
    rows = -(-len(u8) // cols)
    grid = np.zeros((rows * RES, cols * RES, 3), np.uint8)
    for i, im in enumerate(u8):
        grid[(i // cols) * RES:(i // cols + 1) * RES, (i % cols) * RES:(i % cols + 1) * RES] = im
    Image.fromarray(grid).resize((cols * RES * 4, rows * RES * 4), Image.NEAREST).save(out_png)
    shuffled = captions[1:] + captions[:1]  # each image scored against another sample's caption
    return {"step": step, "samples": attribute_accuracy(captions, list(u8)),
            "chance": attribute_accuracy(shuffled, list(u8)),
            "real": attribute_accuracy(captions, list(real))}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/demo")
    ap.add_argument("--max-samples", type=int, default=80000, help="training samples (the main time knob)")
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--per-shard", type=int, default=512)
    a = ap.parse_args(argv)
    # One thread: tiny models gain little from more, and on a shared box OpenMP spinning makes them 10-30x slower.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_SILENT", "true")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("PYTHONWARNINGS", "ignore::FutureWarning")
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache/vqd_scale/torch_extensions"))
    out = (REPO / a.out).resolve() if not Path(a.out).is_absolute() else Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    py = sys.executable
    t0 = time.time()

    stage("1/5 synthetic img2dataset shards", t0)
    last = f"{a.shards - 1:05d}"
    sh(py, "tools/make_synthetic.py", "--out", str(out / "raw"), "--shards", str(a.shards),
       "--per-shard", str(a.per_shard), "--resolution", str(RES))
    stage("2/5 image tokenizer (patch k-means + pruning map)", t0)
    sh(py, "tools/fit_tokenizer.py", "--out", str(out / "tokenizer"), "--resolution", str(RES),
       "--patch", str(PATCH), "--codes", "256", "--images", "2000", "--two-object-prob", "0")
    stage("3/5 token extraction (vqd-extract)", t0)
    sh(py, "-m", "vqd_scale.cli.extract", "--inputs", str(out / "raw" / f"{{00000..{last}}}.tar"),
       "--out-dir", str(out / "tokens"), "--tokenizer", str(out / "tokenizer"), "--resolution", str(RES),
       "--no-progress")
    stage("4/5 training (vqd-train configs/tiny.yaml, one process)", t0)
    sh(py, "-m", "vqd_scale.cli.train", "configs/tiny.yaml", f"run_dir={out / 'run'}",
       f'data.sources=[{{name: synthetic, shards: "{out}/tokens/{{00000..{last}}}.tar"}}]',
       f"data.manifest={out / 'tokens' / 'manifest.json'}", f"max_samples={a.max_samples}",
       f"model.height={RES // PATCH}", f"model.width={RES // PATCH}", "model.dim=128", "model.heads=4",
       "data.batch_size=32", "optim.lr=2e-3",
       "optim.warmup_samples=640", "optim.ema_every=1", "checkpoint.every_steps=100", "logging.every_steps=25",
       "--resume", "auto")
    stage("5/5 sampling (50 steps, guidance 3) and conditional accuracy", t0)
    from vqd_scale.data.synthetic import SyntheticSpec, make_sample
    spec = SyntheticSpec(resolution=RES, seed=1)  # another seed: captions/images never trained on
    held = [make_sample(spec, 0, i) for i in range(64)]
    captions = [c for _, c, _ in held]
    real = np.stack([np.asarray(img) for img, _, _ in held])
    png = out / "samples.png"
    res = sample_and_score(out / "run", out / "tokenizer", captions, real, png)
    wall = time.time() - t0
    print(f"\nsample grid ({len(captions)} held-out captions, checkpoint step {res['step']}): {png}")
    for k in ("color", "shape", "position", "all"):
        print(f"  {k:>8}: samples {res['samples'][k]:.2f} | shuffled captions (chance) {res['chance'][k]:.2f}"
              f" | real images {res['real'][k]:.2f}")
    print(f"conditional accuracy (all attributes right): {res['samples']['all']:.2f} vs chance "
          f"{res['chance']['all']:.2f}; demo wall time {wall:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
