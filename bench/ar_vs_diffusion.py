"""Sampling throughput: VQ-Diffusion (ours, 100/50/25 steps) vs a same-size autoregressive transformer.

The AR baseline lives only here: a decoder-only GPT-style transformer over the N image tokens (BOS
first, raster order) with the same depth, width, heads, MLP ratio, N and K as our
`VQDiffusionTransformer`, and text conditioning the same way as ours: cross-attention in every block to
the precomputed text features (not prefix text tokens). It decodes with a KV cache — N sequential
forwards of one token each — which is the fair (fastest) AR baseline. Both sides use classifier-free
guidance as one batched [cond; uncond] forward per step with the learned null text, the same
`guide`/`truncate`/`sample_categorical` code, the same batch, dtype and device. Before timing, the
cached AR decode is checked against a full causal forward of the sequence it produced.

    OMP_NUM_THREADS=1 python bench/ar_vs_diffusion.py            # CPU fp32, ≈4 min on a shared 2-core box
    OMP_NUM_THREADS=1 python bench/ar_vs_diffusion.py --no-cache-ar   # + the paper-era AR decoder (slow)
    python bench/ar_vs_diffusion.py --device cuda --bf16 --batch 16 --repeats 3
"""
from __future__ import annotations

import argparse
import contextlib
import os
import platform
import subprocess
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from vqd_scale.config import DiscreteDiffusionConfig, SamplerConfig, TransformerConfig
from vqd_scale.diffusion.discrete import MaskAndReplace, sample_categorical
from vqd_scale.diffusion.sampling import guide, sample, truncate
from vqd_scale.generate import make_denoise, stack_context_kv
from vqd_scale.models.transformer import ModelSize, VQDiffusionTransformer, resolve_size

ROOT = Path(__file__).resolve().parents[1]


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, L, H·hd] → [B, H, L, hd]."""
    return x.unflatten(-1, (heads, -1)).transpose(1, 2)


class ARBlock(nn.Module):
    """x += CausalSelfAttn(LN₁(x)); x += CrossAttn(LN₂(x), text); x += MLP(LN₃(x)): our Block minus AdaLN."""

    def __init__(self, dim: int, heads: int, context_dim: int, mlp_ratio: float):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2, self.norm3 = (nn.LayerNorm(dim, eps=1e-5) for _ in range(3))
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj1 = nn.Linear(dim, dim)
        self.q2 = nn.Linear(dim, dim)
        self.kv2 = nn.Linear(context_dim, 2 * dim)
        self.proj2 = nn.Linear(dim, dim)
        self.fc1 = nn.Linear(dim, int(dim * mlp_ratio))
        self.fc2 = nn.Linear(int(dim * mlp_ratio), dim)

    def context_kv(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Cross-attention (k, v) of a context [B, L, Dc], each [B, H, L, hd]."""
        k, v = self.kv2(context).chunk(2, dim=-1)
        return _heads(k, self.heads), _heads(v, self.heads)

    def forward(self, x, k2, v2, cache: dict | None = None, pos: int = 0) -> torch.Tensor:
        """x [B, n, D]; without `cache` a causal pass over all n; with it one new token at `pos`."""
        q, k, v = (_heads(z, self.heads) for z in self.qkv(self.norm1(x)).chunk(3, dim=-1))
        if cache is None:
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            if "k" not in cache:  # allocated on first use so it takes autocast's dtype
                cache["k"] = k.new_empty(k.shape[:2] + (cache["len"], k.shape[-1]))  # [B, H, N, hd]
                cache["v"] = torch.empty_like(cache["k"])
            cache["k"][:, :, pos:pos + 1] = k
            cache["v"][:, :, pos:pos + 1] = v
            # the new token sees every cached position ≤ pos, so no mask is needed
            a = F.scaled_dot_product_attention(q, cache["k"][:, :, :pos + 1], cache["v"][:, :, :pos + 1])
        x = x + self.proj1(a.transpose(1, 2).flatten(2))  # [B, n, D]
        a = F.scaled_dot_product_attention(_heads(self.q2(self.norm2(x)), self.heads), k2, v2)
        x = x + self.proj2(a.transpose(1, 2).flatten(2))
        # GELU2 h·σ(1.702h) = silu(1.702h)/1.702 with both constants folded into the random-init weights,
        # i.e. the same single activation pass our transformer makes.
        return x + self.fc2(F.silu(self.fc1(self.norm3(x))))


class ARTransformer(nn.Module):
    """p(x_i | x_<i, text) over K codes; token id K is BOS; row/col position embeddings like ours."""

    def __init__(self, size: ModelSize, num_classes: int, height: int, width: int, context_dim: int,
                 context_len: int):
        super().__init__()
        d = size.dim
        self.num_classes, self.num_tokens, self.hw = num_classes, height * width, (height, width)
        self.token_emb = nn.Embedding(num_classes + 1, d)  # row K = BOS (ours: [MASK]), same table size
        self.row_emb, self.col_emb = nn.Embedding(height, d), nn.Embedding(width, d)
        self.blocks = nn.ModuleList(ARBlock(d, size.heads, context_dim, size.mlp_ratio) for _ in range(size.layers))
        self.norm_out = nn.LayerNorm(d, eps=1e-5)
        self.out = nn.Linear(d, num_classes)
        self.null_context = nn.Parameter(torch.randn(context_len, context_dim))
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, 0.0, 0.02)

    def positions(self) -> torch.Tensor:
        """Row + column embeddings in raster order, [N, D]."""
        return (self.row_emb.weight[:, None] + self.col_emb.weight[None]).flatten(0, 1)  # [h, w, D] → [N, D]

    def context_kv(self, context: torch.Tensor, guided: bool):
        """Per-layer text K/V, stacked [cond; null] along the batch when guided."""
        kv = tuple(b.context_kv(context) for b in self.blocks)
        if not guided:
            return kv
        null = tuple(b.context_kv(self.null_context[None]) for b in self.blocks)
        return stack_context_kv(kv, null)

    def logits_full(self, tokens: torch.Tensor, kv) -> torch.Tensor:
        """Teacher-forced log-probs F[B, K, N] of tokens Long[B, N] (the check for the cached decode)."""
        bos = torch.full_like(tokens[:, :1], self.num_classes)
        x = self.token_emb(torch.cat([bos, tokens[:, :-1]], 1)) + self.positions()  # [B, N, D]
        for block, (k, v) in zip(self.blocks, kv):
            x = block(x, k, v)
        return F.log_softmax(self.out(self.norm_out(x)).float(), -1).transpose(1, 2)

    def generate(self, context: torch.Tensor, cfg: SamplerConfig, generator: torch.Generator,
                 amp=contextlib.nullcontext(), kv_cache: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Long[B, N] tokens, one forward per token, and the guided log-probs F[B, K, N] it drew from.

        With `kv_cache` each forward pushes one new token; without it each forward re-runs the causal
        pass over the whole prefix, as the paper-era AR samplers did (taming-transformers' `sample`).
        """
        B, guided = context.shape[0], cfg.guidance_scale != 1.0
        with amp:
            kv = self.context_kv(context, guided)
        pos = self.positions()
        caches = [{"len": self.num_tokens} for _ in self.blocks]
        tok = torch.full((B,), self.num_classes, dtype=torch.long, device=context.device)  # BOS
        out, log_ps = [], []
        for i in range(self.num_tokens):
            with amp:
                if kv_cache:
                    x = (self.token_emb(tok) + pos[i])[:, None]  # [B, 1, D]
                else:
                    x = self.token_emb(torch.stack([tok.new_full((B,), self.num_classes), *out], 1)) + pos[:i + 1]
                if guided:
                    x = torch.cat([x, x])  # [cond; uncond], [2B, n, D]
                for block, (k, v), cache in zip(self.blocks, kv, caches):
                    x = block(x, k, v, cache, i) if kv_cache else block(x, k, v)
                logits = self.out(self.norm_out(x[:, -1]))  # [2B or B, K], the newest position
            lp = F.log_softmax(logits.float(), -1)[..., None]  # [·, K, 1], the layout the sampler reads
            lc, lu = lp.chunk(2) if guided else (lp, None)
            exact = cfg.truncation_rate < 1.0
            lp = truncate(guide(lc, lu, cfg.guidance_scale, normalise=exact), cfg.truncation_rate)
            tok = sample_categorical(lp, generator)[:, 0]
            out.append(tok)
            log_ps.append(lc)
        return torch.stack(out, 1), torch.cat(log_ps, 2)


def build(args, device, dtype):
    """Our transformer and the AR baseline at the same size, random init."""
    torch.manual_seed(0)
    cfg = TransformerConfig(size="debug", num_classes=args.K, height=args.side, width=args.side,
                            context_dim=args.context_dim, num_timesteps=100, layers=args.layers, dim=args.dim,
                            heads=args.heads, mlp_ratio=args.mlp_ratio)
    ours = VQDiffusionTransformer(cfg).eval().to(device)
    ar = ARTransformer(resolve_size(cfg), args.K, args.side, args.side, args.context_dim, cfg.context_len)
    return cfg, ours, ar.eval().to(device)


def check_cache(ar: ARTransformer, context: torch.Tensor, cfg: SamplerConfig, device, kv_cache=True) -> float:
    """Max |Δ log p| between a sequential decode and one causal forward over the tokens it drew."""
    tokens, lp_cached = ar.generate(context, cfg, torch.Generator(device).manual_seed(1), kv_cache=kv_cache)
    lp_full = ar.logits_full(tokens, ar.context_kv(context, guided=False))
    return float((lp_cached - lp_full).abs().max())


def param_counts(ours: nn.Module, ar: nn.Module) -> tuple[int, int, int]:
    """(ours, ours without the timestep-modulation tables of AdaLN, AR)."""
    n_ours = sum(p.numel() for p in ours.parameters())
    ada = sum(p.numel() for n, p in ours.named_parameters() if ".norm1." in n or ".norm2." in n)
    return n_ours, n_ours - ada, sum(p.numel() for p in ar.parameters())


def timed(fns: dict, repeats: int, sync) -> dict:
    """Best wall time per entry over `repeats` interleaved rounds (spreads a shared machine's noise evenly)."""
    best = {k: float("inf") for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            best[k] = min(best[k], time.perf_counter() - t0)
    return best


def machine(device) -> str:
    """CPU model (lscpu) or GPU name, torch threads, load average."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        lines = subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
        name = next((l.split(":", 1)[1].strip() for l in lines if l.startswith("Model name")), platform.processor())
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                          cwd=ROOT).stdout.strip()
    return (f"{name}; torch {torch.__version__}, threads {torch.get_num_threads()}, "
            f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}; commit {head}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--K", type=int, default=1024)
    ap.add_argument("--side", type=int, default=32, help="token grid side: N = side²")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--mlp-ratio", type=float, default=4.0)
    ap.add_argument("--context-dim", type=int, default=512)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--guidance", type=float, default=5.0, help="1 = no guidance on either side")
    ap.add_argument("--truncation", type=float, default=1.0)
    ap.add_argument("--steps", type=int, nargs="+", default=[100, 50, 25])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast on both sides")
    ap.add_argument("--no-cache-ar", action="store_true",
                    help="also time the AR model without a KV cache (prefix recomputed per token, like the "
                         "paper-era samplers); ≈N/2 full forwards per image, so minutes on CPU")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: OMP_NUM_THREADS)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda given but torch sees no GPU; drop it or run on a GPU machine")
    amp_dtype = torch.bfloat16 if args.bf16 else None
    amp = torch.autocast(device.type, dtype=torch.bfloat16) if args.bf16 else contextlib.nullcontext()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    cfg, ours, ar = build(args, device, amp_dtype)
    diffusion = MaskAndReplace(DiscreteDiffusionConfig(preset="released", num_timesteps=100), args.K).to(device)
    context = torch.randn(args.batch, cfg.context_len, args.context_dim, device=device)
    scfg = lambda steps: SamplerConfig(steps=steps, guidance_scale=args.guidance, truncation_rate=args.truncation)
    guided = args.guidance != 1.0

    def run_ours(steps):
        den = make_denoise(ours, context, guided=guided, autocast_dtype=amp_dtype)
        return sample(diffusion, den, args.batch, ours.num_tokens, scfg(steps),
                      torch.Generator(device).manual_seed(0), device=device)

    run_ar = lambda: ar.generate(context, scfg(100), torch.Generator(device).manual_seed(0), amp)
    run_ar_nc = lambda: ar.generate(context, scfg(100), torch.Generator(device).manual_seed(0), amp, kv_cache=False)
    header = f"machine: {machine(device)} (at the start)"
    with torch.inference_mode():
        err = check_cache(ar, context[:1], scfg(100), device)  # fp32: the check is of the cache logic
        assert err < 1e-4, f"AR KV-cache decode disagrees with a causal forward: {err}"
        if args.no_cache_ar:
            err_nc = check_cache(ar, context[:1], scfg(100), device, kv_cache=False)
            assert err_nc < 1e-4, f"AR no-cache decode disagrees with a causal forward: {err_nc}"
        run_ours(2), run_ar()  # warm-up (allocator, first-call dispatch)
        fns = {f"ours{s}": (lambda s=s: run_ours(s)) for s in args.steps}
        secs = timed({"ar": run_ar, **fns}, args.repeats, sync)
        if args.no_cache_ar:  # minutes per batch: timed once, after the others
            secs.update(timed({"ar_nc": run_ar_nc}, 1, sync))
    n_ours, n_core, n_ar = param_counts(ours, ar)
    ips = {k: args.batch / v for k, v in secs.items()}
    print(header)
    print(f"size: {args.layers}L×{args.dim}D, {args.heads} heads, MLP×{args.mlp_ratio:g}, {args.side}×{args.side} "
          f"= {ours.num_tokens} tokens, K={args.K}, text {cfg.context_len}×{args.context_dim}; batch {args.batch}, "
          f"{'bf16 autocast' if args.bf16 else 'fp32'}, {args.device}, guidance {args.guidance} "
          f"({'batched [cond; uncond] both sides' if guided else 'off both sides'}), best of {args.repeats}")
    print(f"params: ours {n_ours / 1e6:.3f}M ({n_core / 1e6:.3f}M without AdaLN timestep tables), "
          f"AR {n_ar / 1e6:.3f}M → AR/ours-without-AdaLN {n_ar / n_core:.3f}, AR/ours {n_ar / n_ours:.3f}")
    print(f"AR KV-cache check: max |Δ log p| vs causal forward = {err:.2e}"
          + (f"; no-cache decode {err_nc:.2e}" if args.no_cache_ar else ""))
    nc_col = f"{'ours/AR-no-cache':>18}" if "ar_nc" in secs else ""
    print(f"{'sampler':<34}{'s/batch':>10}{'img/s':>10}{'ours/AR':>10}{nc_col}")
    print(f"{f'AR, KV cache, {ours.num_tokens} steps':<34}{secs['ar']:>10.2f}{ips['ar']:>10.3f}{1.0:>10.2f}")
    if "ar_nc" in secs:
        rel = ips["ar_nc"] / ips["ar"]
        print(f"{f'AR, no cache, {ours.num_tokens} steps':<34}{secs['ar_nc']:>10.2f}{ips['ar_nc']:>10.3f}{rel:>10.2f}")
    for s in args.steps:
        k = f"ours{s}"
        vs_nc = f"{ips[k] / ips['ar_nc']:>18.2f}" if "ar_nc" in secs else ""
        print(f"{f'VQ-Diffusion, {s} steps':<34}{secs[k]:>10.2f}{ips[k]:>10.3f}{ips[k] / ips['ar']:>10.2f}{vs_nc}")
    print(f"load average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
