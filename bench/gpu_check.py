"""One-GPU readiness check: GPU name + commit, bf16 train steps of size B (ZeRO-2, one rank, with and without
activation checkpointing: samples/s, MFU, HFU, peak memory vs the planner), the SDPA kernel, sampling
and a train step against diffusers on the same device. About 3-5 minutes on one H100/H200.

    bash bench/gpu_check.sh                       # = python bench/gpu_check.py --device cuda
    python bench/gpu_check.py --device cpu --tiny # the same code paths at a tiny size (tests/test_gpu_check.py)

Every section is a subprocess running the same script or another bench script, so each measures a fresh
process (no engine left over from the previous one). Paste the output into docs/performance.md.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

# (model overrides for bench/memory.run_config, sampling/diffusers bench arguments)
SIZES = {
    "B": (dict(size="B", layers=None, dim=None, heads=None, side=32, classes=2887, text="ViT-B-32"),
          ["--layers", "19", "--dim", "1024", "--heads", "16", "--K", "2887", "--context-dim", "512"]),
    "tiny": (dict(size="debug", layers=2, dim=64, heads=2, side=4, classes=64, text="tiny"),
             ["--layers", "1", "--dim", "32", "--heads", "2", "--K", "64", "--context-dim", "32"]),
}


def where(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    return f"CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores"


def commit() -> str:
    r = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True,
                           cwd=REPO).stdout.strip()
    return (r.stdout.strip() or "unknown") + (" (with uncommitted changes)" if dirty else "")


def sdpa_kernel_check(device: torch.device, head_dims=(64, 88)) -> list[str]:
    """Which SDPA kernel our attention dispatches to, and whether the flash kernel accepts our head dims."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.profiler import ProfilerActivity, profile

    from vqd_scale.models.transformer import Block
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    out = []
    for hd in head_dims:
        block = Block(16 * hd, 16, 64, 4.0, 10, 0.0).to(device, dtype)
        x = torch.randn(2, 64, 16 * hd, device=device, dtype=dtype)
        t = torch.zeros(2, dtype=torch.long, device=device)
        k, v = block.context_kv(torch.randn(2, 8, 64, device=device, dtype=dtype))
        with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as prof:
            block(x, t, k, v)
        ops = sorted({e.name for e in prof.events() if "scaled_dot_product" in e.name and "attention" in e.name
                      and e.name != "aten::scaled_dot_product_attention"})
        try:
            with torch.no_grad(), sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                block(x, t, k, v)
            forced = "runs"
        except RuntimeError as e:
            forced = f"REFUSED ({str(e).splitlines()[0][:80]})"
        flash = any("flash" in o for o in ops)
        out.append(f"  head dim {hd}: dispatched to {', '.join(ops) or '?'} → {'flash: yes' if flash else 'flash: NO'}; "
                   f"flash kernel forced: {forced}")
    return out


def train_step(args) -> dict:
    """(in a subprocess) one rank, ZeRO-2, bf16: samples/s over timed steps, MFU/HFU, peak memory vs planner."""
    import memory
    from vqd_scale.families import build_task
    from vqd_scale import distributed as D
    from vqd_scale.train.engine import build_engine
    from vqd_scale.train.metrics import peak_flops
    from vqd_scale.train.plan import memory_per_rank

    env = D.detect_env()
    D.init_distributed(env)
    device = D.device_for(env)
    over, _ = SIZES[args.size]
    cfg = memory.run_config(**over, batch=args.batch, stage=2, precision="bf16", ckpt=args.ckpt,
                            bucket=50_000_000)
    torch.manual_seed(0)
    task = build_task(cfg, device)
    engine, precision = build_engine(task.module, cfg.deepspeed, cfg.optim, args.batch, 1, device)
    gen = torch.Generator().manual_seed(0)
    batches = [memory.fake_batch(cfg, gen) for _ in range(2)]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def step(i: int) -> None:
        loss, _ = task.loss(engine, batches[i % 2], torch.Generator(device=device).manual_seed(i))
        engine.backward(loss)
        engine.step()
    for i in range(args.warmup):
        step(i)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    sync()
    t0 = time.perf_counter()
    for i in range(args.steps):
        step(i)
    sync()
    secs = time.perf_counter() - t0
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
    else:  # no allocator counter on CPU: live tensors + the profiled step's highest allocation
        import gc
        gc.collect()
        peak = memory.live_tensor_bytes() + memory.cpu_alloc_peak(lambda: step(0))
    sps = args.batch * args.steps / secs
    peak_f = peak_flops(device, precision)
    predicted = memory_per_rank(cfg, 1, precision, device.type).allocated
    return {"ckpt": args.ckpt, "batch": args.batch, "precision": precision, "samples_per_s": sps,
            "mfu": task.flops.model * sps / peak_f if peak_f else None,
            "hfu": task.flops.hardware * sps / peak_f if peak_f else None,
            "peak_gib": peak / 2**30, "planned_gib": predicted / 2**30,
            "params_m": sum(p.numel() for p in task.module.parameters()) / 1e6}


def _sub(cmd: list[str], timeout: int) -> str:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    if os.environ.get("DS_ACCELERATOR") == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # --device cpu on a GPU machine: keep the subprocesses off the GPU
    r = subprocess.run([sys.executable, *cmd], capture_output=True, text=True, cwd=REPO, timeout=timeout, env=env)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed (exit {r.returncode}):\n{r.stderr[-3000:]}")
    return r.stdout


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", nargs="?", default="all", choices=["all", "train-step"])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="tiny sizes (CPU test of the same code paths)")
    ap.add_argument("--size", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--batch", type=int, default=None, help="per-GPU batch of the train steps (B: 48, tiny: 2)")
    ap.add_argument("--ckpt", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--steps", type=int, default=None, help="timed train steps (B: 10, tiny: 2)")
    ap.add_argument("--warmup", type=int, default=2)
    a = ap.parse_args(argv)
    size = a.size or ("tiny" if a.tiny else "B")
    a.batch = a.batch or (2 if size == "tiny" else 48)
    a.steps = a.steps or (2 if size == "tiny" else 10)
    a.size = size
    if a.what == "train-step":
        print("RESULT " + json.dumps(train_step(a)), flush=True)
        return 0
    device = torch.device(a.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device visible; run with --device cpu --tiny for the CPU version", file=sys.stderr)
        return 2
    os.environ["DS_ACCELERATOR"] = "cuda" if device.type == "cuda" else "cpu"
    import deepspeed
    print(f"gpu_check on {where(device)}; commit {commit()}; torch {torch.__version__}, deepspeed {deepspeed.__version__}")
    print("SDPA kernel of our attention (bf16 on GPU):")
    print("\n".join(sdpa_kernel_check(device, (64, 88) if size == "B" else (8,))))
    _, bench_args = SIZES[size]
    print(f"train step, size {size}, ZeRO-2, 1 rank, bf16, batch {a.batch}:")
    for ckpt in (False, True):
        out = _sub([__file__, "train-step", "--device", a.device, "--size", size, "--batch", str(a.batch),
                    "--steps", str(a.steps), "--warmup", str(a.warmup), *(["--ckpt"] if ckpt else [])], 900)
        r = json.loads(next(ln for ln in out.splitlines() if ln.startswith("RESULT "))[len("RESULT "):])
        util = (f"MFU {100 * r['mfu']:.1f}%, HFU {100 * r['hfu']:.1f}%" if r["mfu"] is not None
                else "MFU/HFU n/a (no datasheet peak for this device)")
        print(f"  activation checkpointing {'on ' if ckpt else 'off'}: {r['samples_per_s']:.2f} samples/s, {util}, "
              f"peak memory {r['peak_gib']:.2f} GiB vs planner {r['planned_gib']:.2f} GiB "
              f"({r['planned_gib'] / r['peak_gib']:.2f}×) [{r['params_m']:.0f}M params, {r['precision']}]")
    steps = ["--steps", "8"] if size == "tiny" else ["--steps", "100"]
    batch = ["--batch", "2"] if size == "tiny" else ["--batch", "16"]
    side = ["--side", "4"] if size == "tiny" else ["--side", "32"]
    print(_sub(["bench/sampling.py", "--device", a.device, "--bf16", "--repeats", "1" if size == "tiny" else "2",
                *bench_args, *steps, *batch, *side], 900).strip())
    dargs = ["--layers", bench_args[1], "--dim", bench_args[3], "--heads", bench_args[5], "--classes", bench_args[7],
             "--grid", side[1], *batch, "--iters", "2" if size == "tiny" else "10"]
    print("train step vs diffusers (bf16 autocast, fwd+bwd of the x0 NLL, same weights):")
    print(_sub(["bench/train_step_vs_diffusers.py", "--device", a.device, "--bf16", *dargs], 900).strip())
    return 0


if __name__ == "__main__":
    sys.exit(main())
