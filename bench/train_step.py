"""Training-step benchmarks: samples/s (DeepSpeed engine vs a plain torch loop, same run) and per-rank
memory of ZeRO 1/2/3 vs ZeRO 0 and vs the ZeRO formula.

    OMP_NUM_THREADS=1 python bench/train_step.py speed --sizes tiny S --steps 4
    OMP_NUM_THREADS=1 python bench/train_step.py memory --size S --world 2

Memory is counted as the bytes of every live tensor storage in the process after the backward pass of
the second step (optimizer state from step 1 and this step's gradients alive; on CPU there is no
allocator counter like `torch.cuda.max_memory_allocated`), minus what existed before the engine was
built (text tower, inputs); on GPU the CUDA peak is reported as well.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")

# size name → (model overrides, text tower, tokens per side, K)
SIZES = {
    "tiny": (dict(size="debug", context_dim=64), dict(model="tiny", tiny_width=64), 8, 256),
    "S": (dict(size="S", context_dim=512), dict(model="ViT-B-32"), 32, 2887),
    "B": (dict(size="B", context_dim=512), dict(model="ViT-B-32"), 32, 2887),
}


def run_config(size: str, batch: int, stage: int, bucket: int = 50_000_000):
    from vqd_scale.families import RunConfig, validate
    from vqd_scale.config import DeepSpeedConfig, TextEncoderConfig, TransformerConfig
    mo, te, side, K = SIZES[size]
    cfg = RunConfig(model=TransformerConfig(num_classes=K, height=side, width=side, **mo),
                    text=TextEncoderConfig(**te),
                    deepspeed=DeepSpeedConfig(zero_stage=stage, bucket_elements=bucket))
    cfg.data.batch_size = batch
    return validate(cfg)


def fake_batch(cfg, gen: torch.Generator) -> dict:
    """Random tokens of the right shapes (the bench measures compute, not data)."""
    b, m = cfg.data.batch_size, cfg.model
    return {"image_tokens": torch.randint(0, m.num_classes, (b, m.height, m.width), generator=gen),
            "text_tokens": torch.randint(1, 49000, (b, 77), generator=gen),
            "drop_text": torch.rand(b, generator=gen) < 0.1}


def live_tensor_bytes() -> int:
    """Bytes of all distinct tensor storages reachable by the garbage collector."""
    seen, total = set(), 0
    for obj in gc.get_objects():
        try:
            if isinstance(obj, torch.Tensor) and not obj.is_meta:
                st = obj.untyped_storage()
                if st.data_ptr() not in seen and st.data_ptr() != 0:
                    seen.add(st.data_ptr())
                    total += st.nbytes()
        except Exception:  # noqa: BLE001 (some tensor subclasses refuse storage access)
            continue
    return total


def speed(sizes: list[str], steps: int, batch: int) -> list[dict]:
    """samples/s of a plain torch AdamW loop vs the DeepSpeed engine (ZeRO 2, one process), same task."""
    from vqd_scale.families import build_task
    from vqd_scale import distributed as D
    from vqd_scale.train.engine import build_engine

    D.init_distributed(D.detect_env())
    device = D.device_for(D.detect_env())
    rows = []
    for size in sizes:
        cfg = run_config(size, batch, stage=2)
        res = {}
        for mode in ("torch", "deepspeed"):
            torch.manual_seed(0)
            task = build_task(cfg, device)
            if mode == "torch":
                module = task.module.to(device)
                opt = torch.optim.AdamW(module.parameters(), lr=1e-4)
            else:
                module, _ = build_engine(task.module, cfg.deepspeed, cfg.optim, batch, 1, device)
            gen = torch.Generator().manual_seed(0)
            res["params"] = sum(p.numel() for p in task.module.parameters())
            times = []
            for i in range(steps + 1):  # the first step is warm-up
                b = fake_batch(cfg, gen)
                t0 = time.perf_counter()
                loss, _ = task.loss(module, b, torch.Generator(device=device).manual_seed(i))
                if mode == "torch":
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    torch.nn.utils.clip_grad_norm_(module.parameters(), 0.5)
                    opt.step()
                else:
                    module.backward(loss)
                    module.step()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
            med = sorted(times[1:])[len(times[1:]) // 2]
            res[mode] = batch / med
            del module, task
            gc.collect()
        rows.append({"size": size, "batch": batch, "torch_samples_s": res["torch"],
                     "deepspeed_samples_s": res["deepspeed"], "ratio_ds_vs_torch": res["deepspeed"] / res["torch"],
                     "params": res["params"]})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def memory_worker(size: str, stage: int, batch: int, bucket: int) -> None:
    """One rank: tensor bytes held after two ZeRO-`stage` steps, gathered to rank 0 and printed."""
    from vqd_scale.families import build_task
    from vqd_scale import distributed as D
    from vqd_scale.train.engine import build_engine

    env = D.detect_env()
    D.init_distributed(env)
    device = D.device_for(env)
    cfg = run_config(size, batch, stage, bucket)
    torch.manual_seed(0)
    task = build_task(cfg, device)
    psi = sum(p.numel() for p in task.module.parameters())
    gc.collect()
    before = live_tensor_bytes() - sum(p.numel() * p.element_size() for p in task.module.parameters())
    engine, precision = build_engine(task.module, cfg.deepspeed, cfg.optim, batch, env.world_size, device)
    gen = torch.Generator().manual_seed(env.rank)
    for i in range(2):
        loss, _ = task.loss(engine, fake_batch(cfg, gen), torch.Generator(device=device).manual_seed(i))
        engine.backward(loss)
        if i == 1:  # measure with optimizer state (from step 1) and this step's gradients both alive
            del loss
            gc.collect()
            held = torch.tensor([float(live_tensor_bytes() - before)])
        engine.step()
    all_held = D.all_gather_cat(held)
    if env.is_main:
        out = {"size": size, "stage": stage, "world": env.world_size, "psi": psi, "precision": precision,
               "per_rank_bytes": all_held.tolist()}
        if device.type == "cuda":
            out["cuda_peak_bytes"] = torch.cuda.max_memory_allocated()
        print("RESULT " + json.dumps(out), flush=True)
    D.shutdown()


def fp32_formula(psi: int, stage: int, n: int) -> float:
    """Bytes per rank of fp32 params + grads + AdamW (m, v) + DeepSpeed's fp32 partition copy, by stage.

    Mixed precision (the ZeRO paper): 2Ψ params + 2Ψ grads + 12Ψ optimizer (fp32 master, m, v):
    stage 1 4Ψ+12Ψ/N, stage 2 2Ψ+14Ψ/N, stage 3 16Ψ/N. In fp32 a weight is 4 bytes and DeepSpeed's
    ZeRO optimizer still keeps its own fp32 partition (the "master" copy), so: stage 0 4Ψ+4Ψ+8Ψ = 16Ψ
    (plain AdamW, no copy), stage 1 8Ψ+12Ψ/N, stage 2 4Ψ+16Ψ/N, stage 3 20Ψ/N.
    """
    return psi * {0: 16.0, 1: 8 + 12 / n, 2: 4 + 16 / n, 3: 20 / n}[stage]


def memory(size: str, world: int, batch: int, bucket: int) -> list[dict]:
    rows = []
    for stage in (0, 1, 2, 3):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={world}", f"--master_port={port}",
               __file__, "memory-worker", "--size", size, "--stage", str(stage), "--batch", str(batch),
               "--bucket", str(bucket)]
        r = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO,
                           env=dict(os.environ, PYTHONWARNINGS="ignore::FutureWarning"))
        line = next((ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if line is None:
            raise RuntimeError(f"stage {stage} run failed:\n{r.stderr[-3000:]}")
        res = json.loads(line[len("RESULT "):])
        res["formula_bytes"] = fp32_formula(res["psi"], stage, world)
        rows.append(res)
    base = max(rows[0]["per_rank_bytes"])
    print(f"\nper-rank tensor memory, {size} (Ψ={rows[0]['psi'] / 1e6:.1f}M), {world} ranks, "
          f"{rows[0]['precision']}, buckets {bucket:.0e} elements; last column = vs ZeRO-0 measured in this run")
    print("| stage | measured per rank (MiB) | formula (MiB) | measured/formula | vs ZeRO-0 |")
    print("|---|---|---|---|---|")
    for r in rows:
        m = max(r["per_rank_bytes"])
        print(f"| {r['stage']} | {m / 2**20:.0f} | {r['formula_bytes'] / 2**20:.0f} | "
              f"{m / r['formula_bytes']:.2f} | {m / base:.2f} |")
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=["speed", "memory", "memory-worker"])
    ap.add_argument("--sizes", nargs="+", default=["tiny", "S"])
    ap.add_argument("--size", default="S")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--stage", type=int, default=2)
    ap.add_argument("--bucket", type=int, default=1_000_000, help="deepspeed.bucket_elements for the memory runs")
    a = ap.parse_args(argv)
    if a.what == "speed":
        rows = speed(a.sizes, a.steps, a.batch)
        print("\n| model | params | batch | torch loop (samples/s) | DeepSpeed ZeRO-2 (samples/s) | ratio |")
        print("|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['size']} | {r['params'] / 1e6:.1f}M | {r['batch']} | {r['torch_samples_s']:.2f} | "
                  f"{r['deepspeed_samples_s']:.2f} | {r['ratio_ds_vs_torch']:.2f} |")
    elif a.what == "memory":
        memory(a.size, a.world, a.batch, a.bucket)
    else:
        memory_worker(a.size, a.stage, a.batch, a.bucket)


if __name__ == "__main__":
    main()
