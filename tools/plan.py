"""Capacity planner: memory per GPU and training time of VQ-Diffusion runs, before asking for a cluster.

    python tools/plan.py                                   # S/B/L on 8 × 80 GB, ZeRO-2, bf16, config's batch
    python tools/plan.py configs/laion_vqd_b.yaml --sizes B --zero 1 2 3 --nodes 1 4 --batch 16 32 64 --ckpt both
    python tools/plan.py --sizes L --gpu-gib 39.5 --peak-tflops 312 --util 0.4   # A100 40 GB

For each combination: per-GPU memory by component (vqd_scale/train/plan.py: ZeRO states by formula,
activations from the step traced on the meta device), the rank-0 total with the fp32 EMA, an estimate of
what the CUDA process reserves on top, and step time / days to `max_samples` at an assumed utilisation of
the peak on the FLOPs that run (models/flops.py; activation checkpointing's recompute costs time). Warns when a configuration does not fit or leaves most of the card idle.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from vqd_scale.errors import UserError  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from vqd_scale.families import load_config
from vqd_scale.train.plan import GiB, largest_batch, plan, warnings_for  # noqa: E402

DEFAULT_CONFIG = REPO / "configs" / "laion_vqd_b.yaml"


def rows(args) -> list[tuple]:
    """(config, plan) for every requested combination."""
    base = load_config(args.config, args.overrides)
    if base.model.num_classes == 0:  # taken from the token manifest at run time
        base = dataclasses.replace(base, model=dataclasses.replace(base.model, num_classes=args.classes))
    out = []
    for size in args.sizes:
        for ckpt in {"on": [True], "off": [False], "both": [False, True]}[args.ckpt]:
            for stage in args.zero:
                for nodes in args.nodes:
                    for batch in args.batch or [base.data.batch_size]:
                        cfg = dataclasses.replace(
                            base,
                            model=dataclasses.replace(base.model, size=size, layers=None, dim=None, heads=None,
                                                      mlp_ratio=None, activation_checkpointing=ckpt),
                            data=dataclasses.replace(base.data, batch_size=batch),
                            deepspeed=dataclasses.replace(base.deepspeed, zero_stage=stage))
                        out.append((cfg, plan(cfg, args.gpus_per_node, nodes, args.gpu_gib, args.peak_tflops * 1e12,
                                              args.util, args.precision)))
    return out


def render(results: list[tuple], args) -> str:
    g = lambda v: f"{v / GiB:.1f}"  # noqa: E731
    head = ("| size | params | ZeRO | GPUs | batch/GPU | ckpt | weights | optimizer | grads+buffers | text | "
            "backward peak | step peak | EMA (rank 0) | rank-0 allocated | + CUDA est. | of card | step (s) | "
            "MFU | samples/s | days |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    notes = []
    for cfg, p in results:
        m = p.memory
        sps = cfg.data.batch_size * cfg.deepspeed.grad_accum * p.world / p.step_s
        lines.append(f"| {p.size} | {p.params / 1e6:.0f}M | {p.zero_stage} | {p.world} | {p.batch} | "
                     f"{'on' if p.checkpointing else 'off'} | {g(m.weights)} | {g(m.optimizer)} | "
                     f"{g(m.gradients + m.buffers)} | {g(m.text_tower)} | {g(m.backward)} | {g(m.step)} | "
                     f"{g(m.ema)} | {g(p.rank0_bytes)} | {g(p.reserved_bytes)} | {100 * p.used:.0f}% | "
                     f"{p.step_s:.3f} | {100 * p.mfu:.0f}% | {sps:.0f} | {p.days:.1f} |")
        for w in warnings_for(p):
            notes.append(f"- {p.size}, ZeRO-{p.zero_stage}, {p.world} GPUs, batch {p.batch}, "
                         f"ckpt {'on' if p.checkpointing else 'off'}: {w}")
    out = [f"memory in GiB per GPU ({args.precision}; 'backward' and 'step' peaks come on top of the rest, the larger "
           f"counts); time at {args.util:.0%} of {args.peak_tflops:.0f} TFLOP/s on the FLOPs that run (recompute "
           f"included; MFU column = what that implies) for max_samples = "
           f"{results[0][0].max_samples:.3g}", "", *lines]
    if notes:
        out += ["", "warnings:", *notes]
    if args.suggest:
        out += ["", "largest per-GPU batch under 90% of the card (rank 0, with the CUDA estimate):"]
        for size in args.sizes:
            for ckpt in (False, True):
                cfg = results[0][0]
                cfg = dataclasses.replace(cfg, model=dataclasses.replace(
                    cfg.model, size=size, layers=None, dim=None, heads=None, mlp_ratio=None,
                    activation_checkpointing=ckpt))
                bs = largest_batch(cfg, args.gpus_per_node, args.nodes[0], args.gpu_gib, args.precision)
                out.append(f"- {size}, ZeRO-{cfg.deepspeed.zero_stage}, ckpt {'on' if ckpt else 'off'}: {bs}")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config", nargs="?", default=str(DEFAULT_CONFIG))
    ap.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. data.batch_size=32")
    ap.add_argument("--sizes", nargs="+", default=["S", "B", "L"])
    ap.add_argument("--zero", type=int, nargs="+", default=[2])
    ap.add_argument("--gpus-per-node", type=int, default=8)
    ap.add_argument("--nodes", type=int, nargs="+", default=[1])
    ap.add_argument("--batch", type=int, nargs="+", help="per-GPU micro-batch (default: the config's)")
    ap.add_argument("--ckpt", choices=["on", "off", "both"], default="both", help="activation checkpointing")
    ap.add_argument("--classes", type=int, default=2887, help="K when the config takes it from the manifest")
    ap.add_argument("--precision", choices=["bf16", "fp16", "fp32"], default="bf16")
    ap.add_argument("--gpu-gib", type=float, default=79.6, help="usable memory per GPU (an 80 GB H100: 79.6 GiB)")
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="dense peak per GPU (H100 SXM bf16: 989)")
    ap.add_argument("--util", type=float, default=0.35,
                    help="assumed fraction of peak on the FLOPs that run (HFU; = MFU without checkpointing)")
    ap.add_argument("--suggest", action="store_true", help="also print the largest batch that fits")
    args = ap.parse_args(argv)
    if not 0 < args.util <= 1:
        ap.error("--util must be in (0, 1]")
    try:
        results = rows(args)
    except UserError as e:
        print(f"plan: {e}", file=sys.stderr)
        return 2
    print(render(results, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
