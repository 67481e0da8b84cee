"""fwd+bwd step time of our transformer vs diffusers' Transformer2DModel with identical weights.

Same config, same batch, one shared t (diffusers cannot take per-sample t). Runs are interleaved
so drift on a shared machine hits both equally; prints medians and ours/diffusers speed ratio.
    python bench/train_step_vs_diffusers.py [--device cuda] [--threads 1]
"""
from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from vqd_scale.compat import import_open_clip
from vqd_scale.config import TransformerConfig
from vqd_scale.interop.diffusers import split_null, to_diffusers
from vqd_scale.models.transformer import VQDiffusionTransformer


def step_time(fn, device) -> float:
    """Seconds for one call of fn, synchronised on GPU."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--grid", type=int, default=16, help="token grid side (N = grid²)")
    p.add_argument("--classes", type=int, default=1024)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (GPU)")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    import_open_clip()  # torchvision patch before diffusers imports transformers
    from diffusers import Transformer2DModel

    cfg = TransformerConfig(size="debug", num_classes=a.classes, height=a.grid, width=a.grid, context_dim=512,
                            num_timesteps=100, layers=a.layers, dim=a.dim, heads=a.heads)
    torch.manual_seed(0)
    ours = VQDiffusionTransformer(cfg).to(device).train()
    conf, dsd = to_diffusers(ours.state_dict(), cfg)
    theirs = Transformer2DModel(**conf)
    theirs.load_state_dict(split_null(dsd)[0], strict=True)
    theirs = theirs.to(device).train()

    n = a.grid * a.grid
    x = torch.randint(0, a.classes + 1, (a.batch, n), device=device)
    x0 = torch.randint(0, a.classes, (a.batch, n), device=device)
    ctx = torch.randn(a.batch, 77, 512, device=device)
    t = 42
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=a.bf16)

    def run_ours():
        with amp:
            out = ours(x, torch.full((a.batch,), t, device=device), ctx)
        out.gather(1, x0.unsqueeze(1)).mean().neg().backward()  # NLL of x0, as the aux loss
        ours.zero_grad(set_to_none=True)

    def run_theirs():
        with amp:
            out = theirs(x, encoder_hidden_states=ctx, timestep=torch.tensor(t, device=device)).sample
        out.gather(1, x0.unsqueeze(1)).mean().neg().backward()
        theirs.zero_grad(set_to_none=True)

    for _ in range(2):  # warm-up
        run_ours(), run_theirs()
    t_ours, t_theirs = [], []
    for _ in range(a.iters):
        t_ours.append(step_time(run_ours, device))
        t_theirs.append(step_time(run_theirs, device))
    mo, mt = statistics.median(t_ours), statistics.median(t_theirs)
    dev = torch.cuda.get_device_name() if device.type == "cuda" else f"{platform.processor() or 'cpu'}, {a.threads} thread(s)"
    print(f"config: layers={a.layers} dim={a.dim} heads={a.heads} N={n} K={a.classes} batch={a.batch} "
          f"bf16={a.bf16} device={dev} torch={torch.__version__}")
    print(f"ours      fwd+bwd median {mo * 1e3:8.1f} ms")
    print(f"diffusers fwd+bwd median {mt * 1e3:8.1f} ms")
    print(f"speed ratio ours/diffusers = {mt / mo:.2f}x")


if __name__ == "__main__":
    main()
