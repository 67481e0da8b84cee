"""Peak memory per rank of a real training step vs the capacity planner's prediction (vqd_scale/train/plan.py).

    OMP_NUM_THREADS=1 python bench/memory.py --world 2 --stages 0 1 2 3 --precisions fp32 bf16
    OMP_NUM_THREADS=1 python bench/memory.py --size S --side 32 --classes 2887 --batch 2 --world 2

Each configuration runs as `--world` gloo ranks (CPU) or on the GPUs: a DeepSpeed engine from the run's
config, one warm-up step (AdamW creates its state), then the measured step (forward, loss, backward,
optimizer). On GPU the peak is `torch.cuda.max_memory_allocated`; on CPU, which has no allocator
counter, it is the bytes of all live tensors before the step plus the highest running sum of the
CPU allocator's allocation/free events during it (torch profiler, `profile_memory=True`).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from train_step import live_tensor_bytes  # noqa: E402  (bench/ is on sys.path: the same measurement)
os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
MiB = 2**20


def run_config(size: str, layers, dim, heads, side: int, classes: int, batch: int, stage: int, precision: str,
               ckpt: bool, bucket: int, accum: int = 1, text: str = "tiny"):
    """A validated RunConfig for one measured configuration (random tokens, tiny or real text tower)."""
    from vqd_scale.config import DeepSpeedConfig, TextEncoderConfig, TransformerConfig
    from vqd_scale.families import RunConfig, validate
    text_cfg = TextEncoderConfig(model=text) if text != "tiny" else TextEncoderConfig(model="tiny", tiny_width=64)
    width = 64 if text == "tiny" else 512
    cfg = RunConfig(model=TransformerConfig(size=size, layers=layers, dim=dim, heads=heads, num_classes=classes,
                                            height=side, width=side, context_dim=width,
                                            activation_checkpointing=ckpt),
                    text=text_cfg, deepspeed=DeepSpeedConfig(zero_stage=stage, precision=precision,
                                                             bucket_elements=bucket, grad_accum=accum))
    cfg.data.batch_size = batch
    return validate(cfg)


def cpu_alloc_peak(fn) -> int:
    """Highest running sum of CPU allocations minus frees while `fn` runs (bytes above the start)."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")
    cur = peak = 0
    for _, n in events:
        cur += n
        peak = max(peak, cur)
    return peak


def fake_batch(cfg, gen: torch.Generator) -> dict:
    """Random tokens of the right shapes (the bench measures the step, not the data)."""
    b, m = cfg.data.batch_size, cfg.model
    return {"image_tokens": torch.randint(0, m.num_classes, (b, m.height, m.width), generator=gen),
            "text_tokens": torch.randint(1, 49000, (b, 77), generator=gen),
            "drop_text": torch.rand(b, generator=gen) < 0.1}


def measure_step(cfg, env, device) -> dict:
    """{base, peak, precision}: bytes on this rank before and at the peak of one steady-state training step."""
    from vqd_scale.families import build_task
    from vqd_scale.train.engine import build_engine

    gc.collect()
    # Measured above what exists before the task is built (imports, the process group).
    before = torch.cuda.memory_allocated(device) if device.type == "cuda" else live_tensor_bytes()
    torch.manual_seed(0)
    task = build_task(cfg, device)
    engine, precision = build_engine(task.module, cfg.deepspeed, cfg.optim, cfg.data.batch_size, env.world_size,
                                     device)
    gen = torch.Generator().manual_seed(env.rank)

    def step(i: int) -> None:
        for micro in range(cfg.deepspeed.grad_accum):
            loss, _ = task.loss(engine, fake_batch(cfg, gen), torch.Generator(device=device).manual_seed(i + micro))
            engine.backward(loss)
            engine.step()
    step(0)  # warm-up: AdamW's state exists from here on
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step(1)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated(device)
    else:
        base = live_tensor_bytes()
        peak = base + cpu_alloc_peak(lambda: step(1))
    del engine, task
    gc.collect()
    return {"base": base - before, "peak": peak - before, "precision": precision}


def predicted(cfg, world: int, precision: str, device_type: str) -> float:
    """The planner's allocated bytes per rank (no EMA: the bench builds none)."""
    from vqd_scale.train.plan import memory_per_rank
    return memory_per_rank(cfg, world, precision, device_type).allocated


def worker(configs: list[dict]) -> None:
    """One rank: measure every configuration in turn; rank 0 prints one RESULT line per configuration."""
    from vqd_scale import distributed as D
    env = D.detect_env()
    D.init_distributed(env)
    device = D.device_for(env)
    for c in configs:
        cfg = run_config(**c)
        res = measure_step(cfg, env, device)
        peaks = D.all_gather_cat(torch.tensor([float(res["peak"])], device=device)).tolist()
        if env.is_main:
            pred = predicted(cfg, env.world_size, res["precision"], device.type)
            print("RESULT " + json.dumps({**c, "world": env.world_size, "measured": max(peaks), "predicted": pred,
                                          "base": res["base"]}), flush=True)
    D.barrier()
    D.shutdown()
    # Skip interpreter finalisation: gloo worker threads still holding async work (ZeRO-3 prefetch) can abort
    # the process there ("terminate called without an active exception"; pytorch/pytorch#179291).
    sys.stdout.flush()
    os._exit(0)


def run(configs: list[dict], world: int, timeout: int = 1200) -> list[dict]:
    """Measure each configuration in fresh processes on `world` ranks (torchrun); the RESULT records.

    One process per configuration: an engine freed while the next one is measured would lower its peak.
    """
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.setdefault("PYTHONWARNINGS", "ignore")
    out = []
    for c in configs:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        r = subprocess.run([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={world}",
                            f"--master_port={port}", __file__, "worker", json.dumps([c])],
                           capture_output=True, text=True, cwd=REPO, env=env, timeout=timeout)
        rows = [json.loads(ln[len("RESULT "):]) for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
        if r.returncode != 0 or len(rows) != 1:
            raise RuntimeError(f"memory bench failed for {c} (exit {r.returncode}):\n{r.stderr[-4000:]}")
        out += rows
        print(table(rows).splitlines()[-1], file=sys.stderr, flush=True)  # progress
    return out


def table(rows: list[dict]) -> str:
    lines = ["| size | stage | precision | ckpt | batch | ranks | measured peak (MiB) | planner (MiB) | planner/measured |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        name = r["size"] if r["layers"] is None else f"{r['size']} {r['layers']}×{r['dim']}"
        lines.append(f"| {name} | {r['stage']} | "
                     f"{r['precision']} | {'on' if r['ckpt'] else 'off'} | {r['batch']} | {r['world']} | "
                     f"{r['measured'] / MiB:.1f} | {r['predicted'] / MiB:.1f} | {r['predicted'] / r['measured']:.3f} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", nargs="?", default="run", choices=["run", "worker"])
    ap.add_argument("configs", nargs="?", help=argparse.SUPPRESS)
    ap.add_argument("--size", default="debug")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--side", type=int, default=16)
    ap.add_argument("--classes", type=int, default=1024)
    ap.add_argument("--batch", type=int, nargs="+", default=[4])
    ap.add_argument("--stages", type=int, nargs="+", default=[0, 1, 2, 3])
    ap.add_argument("--precisions", nargs="+", default=["fp32", "bf16"])
    ap.add_argument("--ckpt", choices=["off", "on", "both"], default="off")
    ap.add_argument("--accum", type=int, default=1)
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--bucket", type=int, default=1_000_000)
    ap.add_argument("--text", default="tiny")
    a = ap.parse_args(argv)
    if a.what == "worker":
        worker(json.loads(a.configs))
        return
    layers = None if a.size != "debug" else a.layers
    dims = dict(layers=layers, dim=None if layers is None else a.dim, heads=None if layers is None else a.heads)
    configs = [dict(size=a.size, **dims, side=a.side, classes=a.classes, batch=bs, stage=st, precision=p, ckpt=ck,
                    bucket=a.bucket, accum=a.accum if st >= 2 or p == "fp32" else 1, text=a.text)
               for p in a.precisions for st in a.stages for ck in ({"off": [False], "on": [True]}.get(a.ckpt, [False, True]))
               for bs in a.batch]
    rows = run(configs, a.world)
    print(table(rows))


if __name__ == "__main__":
    main()
