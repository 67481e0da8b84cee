"""One rank of tests/test_gpu_paths.py's bf16 DeepSpeed checks (run as 2 gloo ranks on CPU).

For each ZeRO stage: a tiny VQ-Diffusion transformer trained a few bf16 steps (grad_accum 2 where
DeepSpeed can accumulate in fp32), then
- the EMA started with `fp32_master(engine)` must equal the fp32 weights that DeepSpeed's own
  zero_to_fp32 consolidates from the checkpoint files (stages 1-3; stage 0 keeps the fp32 copy in
  its optimizer), while the module's bf16 weights differ from them;
- a new engine loaded like the world-size-change resume (module ← consolidated fp32, then
  `set_fp32_master`) must hold exactly those fp32 values as its master copy;
- the optimizer accumulates in fp32 and reduces in fp32.
Rank 0 prints `RESULT {json}`.
"""
import gc
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from vqd_scale.config import DeepSpeedConfig, OptimConfig, TransformerConfig
from vqd_scale.families.vqd.task import TrainableVQD
from vqd_scale import distributed as D
from vqd_scale.train.ema import EMA
from vqd_scale.train.engine import build_engine, fp32_master, set_fp32_master

MODEL = TransformerConfig(size="debug", num_classes=16, height=4, width=4, context_dim=16, context_len=5,
                          num_timesteps=10)


def train_steps(engine, steps: int, accum: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps * accum):
        x = torch.randint(0, 17, (2, 16), generator=gen)
        t = torch.randint(0, 10, (2,), generator=gen)
        ctx = torch.randn(2, 5, 16, generator=gen)
        x0 = torch.randint(0, 16, (2, 16), generator=gen)
        out = engine(x, t, context=ctx, drop_text=torch.tensor([True, False]))
        engine.backward(-out.gather(1, x0.unsqueeze(1)).mean())
        engine.step()


def read_all(engine) -> dict[str, torch.Tensor]:
    read = fp32_master(engine)
    return {n: read(p).detach().cpu().clone() for n, p in engine.module.named_parameters()}


def check_stage(stage: int, env, device, tmp: Path) -> dict:
    accum = 2 if stage >= 2 else 1  # stages 0/1 cannot accumulate in fp32 with consolidatable checkpoints
    cfg = DeepSpeedConfig(zero_stage=stage, precision="bf16", grad_accum=accum, bucket_elements=1_000_000)
    optim = OptimConfig(lr=3e-4)
    torch.manual_seed(0)
    engine, precision = build_engine(TrainableVQD(MODEL), cfg, optim, 2, env.world_size, device)
    train_steps(engine, 3, accum, seed=env.rank)
    ema = EMA(0.5, 1, keep=env.is_main)
    ema.init_from(engine.module, fp32_master(engine))
    tag = f"s{stage}"
    engine.save_checkpoint(str(tmp), tag=tag)
    dist.barrier()
    out = {"precision": precision, "optimizer": type(engine.optimizer).__name__,
           "accum_dtype": str(getattr(engine.optimizer, "gradient_accumulation_dtype", None)),
           "comm_dtype": str(engine.communication_data_type)}
    if stage >= 1:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
        ref = get_fp32_state_dict_from_zero_checkpoint(str(tmp), tag=tag)  # only file reads: same on all ranks
    else:
        ref = read_all(engine)  # stage 0: the optimizer's own fp32 copy (no consolidation tool for it)
    bf16 = {}
    with_gather = stage == 3
    for n, p in engine.module.named_parameters():
        if with_gather:
            import deepspeed
            with deepspeed.zero.GatheredParameters([p]):
                bf16[n] = p.detach().float().cpu().clone()
        else:
            bf16[n] = p.detach().float().cpu().clone()
    if env.is_main:
        shadow = ema.state_dict()
        out["ema_equals_fp32_master"] = all(torch.equal(shadow[n], ref[n].float()) for n in ref)
        out["bf16_differs_from_master"] = any(not torch.equal(bf16[n], ref[n].float()) for n in ref)
        out["bf16_is_rounded_master"] = all(torch.equal(bf16[n], ref[n].float().bfloat16().float()) for n in ref)
    # The world-size-change resume: module loaded from consolidated fp32 weights, then the engine built.
    torch.manual_seed(1)
    module = TrainableVQD(MODEL)
    module.load_state_dict({n: v.float() for n, v in ref.items()})
    engine2, _ = build_engine(module, cfg, optim, 2, env.world_size, device)
    before = read_all(engine2)
    set_fp32_master(engine2, ref)
    after = read_all(engine2)
    if env.is_main:
        out["master_rounded_without_set"] = any(not torch.equal(before[n], ref[n].float()) for n in ref)
        out["master_exact_after_set"] = all(torch.equal(after[n], ref[n].float()) for n in ref)
    train_steps(engine2, 1, accum, seed=10 + env.rank)  # the restored master still trains
    del engine, engine2
    gc.collect()
    return out


def main() -> None:
    stages = [int(s) for s in sys.argv[1].split(",")]  # argv: STAGES CHECKPOINT_DIR
    env = D.detect_env()
    D.init_distributed(env)
    device = D.device_for(env)
    results = {stage: check_stage(stage, env, device, Path(sys.argv[2])) for stage in stages}
    if env.is_main:
        print("RESULT " + json.dumps(results), flush=True)
    D.barrier()
    D.shutdown()
    # Skip interpreter finalisation: gloo worker threads still holding async work (ZeRO-3 prefetch) can abort
    # the process there ("terminate called without an active exception"; pytorch/pytorch#179291).
    os._exit(0)


if __name__ == "__main__":
    main()
