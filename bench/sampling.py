"""Sampling throughput: our transformer + sampler vs diffusers' Transformer2DModel + VQDiffusionScheduler.

Both models carry identical weights (mapped by `vqd_scale.interop.diffusers`); the diffusers side is
the `VQDiffusionPipeline` denoising loop verbatim (cond+uncond batch, CFG, truncate, clamp,
`scheduler.step`), minus text encoding and VQ decoding, which both sides would share. Prints images/s
and ratios measured in the same run; `--append` adds the figures to docs/performance.md.

    OMP_NUM_THREADS=2 python bench/sampling.py [--append]
    python bench/sampling.py --device cuda --bf16 --layers 19 --dim 1024 --heads 16 --K 2887 --batch 16
"""
from __future__ import annotations

import argparse
import os
import platform
import subprocess
import time
from pathlib import Path

import torch

from vqd_scale.compat import import_open_clip
from vqd_scale.config import DiscreteDiffusionConfig, SamplerConfig, TransformerConfig
from vqd_scale.diffusion.discrete import MaskAndReplace
from vqd_scale.diffusion.presets import SCHEDULE_PRESETS
from vqd_scale.diffusion.sampling import sample
from vqd_scale.generate import make_denoise
from vqd_scale.interop.diffusers import split_null, to_diffusers
from vqd_scale.models.transformer import VQDiffusionTransformer

ROOT = Path(__file__).resolve().parents[1]
import_open_clip()  # diffusers' model imports pull in torchvision, which needs the compat patch here


def build(args, device: torch.device):
    """Our model and a diffusers Transformer2DModel with the same weights (checked on one forward), on `device`."""
    from diffusers import Transformer2DModel

    torch.manual_seed(0)
    cfg = TransformerConfig(size="debug", num_classes=args.K, height=args.side, width=args.side,
                            context_dim=args.context_dim, num_timesteps=100, layers=args.layers,
                            dim=args.dim, heads=args.heads, mlp_ratio=4.0)
    ours = VQDiffusionTransformer(cfg).eval()
    config, dsd = to_diffusers(ours.state_dict(), cfg)
    theirs = Transformer2DModel(**config).eval()
    rest, _ = split_null(dsd)
    theirs.load_state_dict(rest)
    ours, theirs = ours.to(device), theirs.to(device)
    x = torch.randint(0, args.K + 1, (2, args.side ** 2), device=device)
    ctx = torch.randn(2, 77, args.context_dim, device=device)
    with torch.inference_mode():  # fp32 (GPU matmuls may use TF32: a looser bound there)
        diff = (ours(x, torch.tensor([7, 7], device=device), ctx) - theirs(
            x, encoder_hidden_states=ctx, timestep=torch.tensor(7, device=device)).sample).abs().max()
    assert diff < (1e-4 if device.type == "cpu" else 1e-2), f"weight mapping broken: max |Δ log p| = {diff}"
    return cfg, ours, theirs


def run_ours(model, diffusion, context, steps, guidance, truncation, seed, amp=None):
    """Our path: `generate.make_denoise` (context K/V once, one [cond; uncond] forward) + `sample`."""
    cfg = SamplerConfig(steps=steps, guidance_scale=guidance, truncation_rate=truncation)
    with torch.inference_mode():
        den = make_denoise(model, context, guided=guidance != 1.0, autocast_dtype=amp)
        gen = torch.Generator(device=context.device).manual_seed(seed)
        return sample(diffusion, den, context.shape[0], model.num_tokens, cfg, gen)


@torch.inference_mode()
def run_diffusers(transformer, scheduler, context, null, steps, guidance, truncation, seed, amp=None):
    """The VQDiffusionPipeline loop (diffusers 0.42), from prompt embeddings to tokens."""
    from diffusers.pipelines.deprecated.vq_diffusion.pipeline_vq_diffusion import VQDiffusionPipeline

    B, device = context.shape[0], context.device
    cfg_on = guidance > 1.0
    embeds = torch.cat([null.expand(B, -1, -1), context]) if cfg_on else context
    generator = torch.Generator(device=device).manual_seed(seed)
    sample_ = torch.full((B, transformer.num_latent_pixels), transformer.num_vector_embeds - 1, device=device)
    scheduler.set_timesteps(steps, device=device)
    for t in scheduler.timesteps:
        inp = torch.cat([sample_] * 2) if cfg_on else sample_
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            out = transformer(inp, encoder_hidden_states=embeds, timestep=t).sample.float()
        if cfg_on:
            out_u, out_c = out.chunk(2)
            out = out_u + guidance * (out_c - out_u)
            out -= torch.logsumexp(out, dim=1, keepdim=True)
        out = VQDiffusionPipeline.truncate(None, out, truncation).clamp(-70)
        sample_ = scheduler.step(out, timestep=t, sample=sample_, generator=generator).prev_sample
    return sample_


def timed(fns: dict, repeats: int, device: torch.device = torch.device("cpu")) -> dict:
    """Best wall time per entry over `repeats` interleaved rounds (interleaving spreads the noise
    of a shared machine over all entries alike); synchronised on GPU."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    best = {k: float("inf") for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            best[k] = min(best[k], time.perf_counter() - t0)
    return best


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--K", type=int, default=1024)
    ap.add_argument("--side", type=int, default=32)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--context-dim", type=int, default=512)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--guidance", type=float, default=5.0)
    ap.add_argument("--truncation", type=float, default=1.0)  # the pipeline's default
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--steps", type=int, default=100, help="equal steps for both; ours also at a quarter of them")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast for both transformers")
    ap.add_argument("--append", action="store_true", help="append the figures to docs/performance.md")
    args = ap.parse_args()
    from diffusers import VQDiffusionScheduler

    device = torch.device(args.device)
    amp = torch.bfloat16 if args.bf16 else None
    n, q = args.steps, max(1, args.steps // 4)
    cfg, ours, theirs = build(args, device)
    diffusion = MaskAndReplace(DiscreteDiffusionConfig(preset="released", num_timesteps=100), args.K).to(device)
    scheduler = VQDiffusionScheduler(args.K + 1, 100, *SCHEDULE_PRESETS["released"])
    context = torch.randn(args.batch, 77, args.context_dim, device=device)
    null = ours.null_context.detach()
    B = args.batch
    run = lambda steps: run_ours(ours, diffusion, context, steps, args.guidance, args.truncation, 0, amp)
    run_d = lambda steps: run_diffusers(theirs, scheduler, context, null, steps, args.guidance, args.truncation, 0,
                                        amp)
    run(2), run_d(2)  # warm-up (allocator, first-call dispatch)
    secs = timed({"diff": lambda: run_d(n), "ours": lambda: run(n), "ours_q": lambda: run(q)}, args.repeats, device)
    ips = {k: B / v for k, v in secs.items()}
    where = (torch.cuda.get_device_name(device) if device.type == "cuda" else
             f"CPU, torch threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f} at the end")
    size = (f"{args.layers}L×{args.dim}D, {args.side}×{args.side} tokens, K={args.K}, batch {B}, guidance "
            f"{args.guidance}, truncation {args.truncation}, {'bf16' if amp else 'fp32'}, best of {args.repeats}")
    lines = [
        f"sampling ({size}; {where}; ratios are same-run)",
        f"  diffusers Transformer2DModel + VQDiffusionScheduler, {n} steps: {ips['diff']:.3f} img/s",
        f"  ours, {n} steps (equal steps):                                {ips['ours']:.3f} img/s"
        f"  → ratio {ips['ours'] / ips['diff']:.2f}×",
        f"  ours, {q} skip-steps vs diffusers {n} steps:                   {ips['ours_q']:.3f} img/s"
        f"  → ratio {ips['ours_q'] / ips['diff']:.2f}×",
    ]
    print("\n".join(lines))
    if args.append:
        append(lines)


def append(lines):
    """Add a dated block with machine and commit to docs/performance.md (created if missing)."""
    cpu = next((l.split(":", 1)[1].strip() for l in subprocess.run(["lscpu"], capture_output=True, text=True)
                .stdout.splitlines() if l.startswith("Model name")), platform.processor())
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                          cwd=ROOT).stdout.strip()
    path = ROOT / "docs" / "performance.md"
    if not path.exists():
        path.write_text("# Performance\n\nFigures appended by the `bench/` scripts (each compares against a "
                        "baseline measured in the same run).\n")
    block = [f"\n## bench/sampling.py — {time.strftime('%Y-%m-%d')}, {cpu}, {torch.get_num_threads()} threads, "
             f"commit {head}\n", "```", *lines, "```", ""]
    with path.open("a") as f:
        f.write("\n".join(block))


if __name__ == "__main__":
    main()
