"""Quality benchmark: the demo-size model trained under settings that matter, held-out VLB and accuracy.

    OMP_NUM_THREADS=1 python bench/quality.py [--out runs/quality] [--max-samples 80000] [--parallel 2]

Each training variant is the demo's real pipeline (`tools/demo.py`: synthetic shards → k-means
tokenizer → vqd-extract → `vqd-train configs/tiny.yaml` + the demo recipe) from the same seed and
sample budget, with one setting changed. For each it prints the held-out VLB (nats per image token,
all T terms: what the training loss estimates) and the attribute accuracy of 256 samples for held-out
captions (colour / shape / position / count / all), with the demo's sampler (50 steps, guidance 1,
truncation 0.7).
The `base` run is then sampled with other sampler settings (steps, guidance, purity, truncation).
Not a timed test: quality only; figures go to docs/results.md with the commit.
"""
from __future__ import annotations

import argparse
import json
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))
import demo  # noqa: E402  (tools/demo.py: the stages this benchmark varies)

# One setting changed from the demo recipe per variant.
VARIANTS: dict[str, list[str]] = {
    "base": [],
    "no_clip": ["optim.grad_clip=0"],
    "uniform_t": ["diffusion.importance_sampling=false"],
    "mask_and_replace": ["diffusion.preset=paper"],
}
# Sampler settings the base run is sampled with: changes from demo.SAMPLER (50 steps, guidance 1, truncation 0.7).
SAMPLER_CHANGES: list[dict] = [
    {}, dict(steps=25), dict(steps=100),
    dict(guidance_scale=3.0), dict(guidance_scale=5.0),
    dict(truncation_rate=1.0), dict(truncation_rate=0.86), dict(truncation_rate=0.5),
    dict(guidance_scale=3.0, truncation_rate=1.0), dict(guidance_scale=3.0, truncation_rate=1.0, purity=True),
    dict(purity=True),
]


def label(change: dict) -> str:
    """'50 steps, g1, r0.7[, purity]' for demo.SAMPLER with `change` applied."""
    s = {**demo.SAMPLER, **change}
    return (f"{s['steps']} steps, g{s['guidance_scale']:g}, r{s['truncation_rate']:g}"
            + (", purity" if s.get("purity") else ""))


SAMPLERS: dict[str, dict] = {label(c): c for c in SAMPLER_CHANGES}
DEFAULT = label({})


def evaluate(run_dir: Path, data: Path, samplers: dict[str, dict], seed: int) -> dict:
    """Held-out VLB and attribute accuracy of the newest checkpoint of `run_dir` under each sampler."""
    import torch

    from vqd_scale.config import SamplerConfig
    from vqd_scale.eval.quality import sample_accuracy, synthetic_heldout, to_unit, vlb_per_token
    from vqd_scale.models.vqvae import ImageTokenizer

    cfg, model, text, diffusion, step = demo.load_run(run_dir)
    tok = ImageTokenizer.load(data / "tokenizer")
    held = synthetic_heldout(demo.HELDOUT, demo.RES)
    x0 = tok.encode(to_unit(held.images)).flatten(1)  # [n, h·w]
    with torch.no_grad():
        context = text(text.tokenize(held.captions))
    vlb = vlb_per_token(model, diffusion, x0, context, torch.Generator().manual_seed(seed))
    out = {"step": step, "vlb": vlb["vlb"], "vlb_per_t": vlb["per_t"], "samplers": {}}
    for name, over in samplers.items():
        res = sample_accuracy(model, text, diffusion, tok, held, SamplerConfig(**{**demo.SAMPLER, **over}), seed)
        out["samplers"][name] = {"samples": res["samples"], "chance": res["chance"]}
    metrics = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    out["clip_frac"] = sum(m.get("clip_frac", 0.0) for m in metrics) / max(len(metrics), 1)
    out["grad_norm_median"] = sorted(m["grad_norm"] for m in metrics)[len(metrics) // 2]
    return out


def row(name: str, r: dict, sampler: str) -> str:
    s = r["samplers"][sampler]["samples"]
    return (f"| {name} | {r['vlb']:.3f} | {s['color']:.2f} | {s['shape']:.2f} | {s['position']:.2f} | "
            f"{s['count']:.2f} | **{s['all']:.2f}** | {r['clip_frac']:.2f} | {r['grad_norm_median']:.3g} |")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/quality")
    ap.add_argument("--max-samples", type=int, default=80000)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--extra", nargs="*", default=[], help="overrides added to every variant (exploration)")
    ap.add_argument("--tag", default="", help="suffix of the run directories (several --extra settings side by side)")
    ap.add_argument("--parallel", type=int, default=1, help="training runs at once (one CPU thread each)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="the base run too with the default sampler only")
    a = ap.parse_args(argv)
    demo.quiet_env()
    out = (REPO / a.out).resolve() if not Path(a.out).is_absolute() else Path(a.out)
    data = out / "data"
    data.mkdir(parents=True, exist_ok=True)
    demo.prepare_data(data)

    def run(name: str) -> None:
        demo.train(data, out / f"{name}{a.tag}", a.max_samples, [f"seed={a.seed}", *VARIANTS[name], *a.extra], quiet=True)

    with ThreadPoolExecutor(a.parallel) as pool:
        list(pool.map(run, a.variants))
    results = {}
    for name in a.variants:
        samplers = SAMPLERS if name == "base" and not a.quick else {DEFAULT: {}}
        results[name] = evaluate(out / f"{name}{a.tag}", data, samplers, a.seed)
        (out / f"{name}{a.tag}" / "quality.json").write_text(json.dumps(results[name], indent=1))
    chance = next(iter(results.values()))["samplers"][DEFAULT]["chance"]
    head = ("| {} | held-out VLB (nats/token) | colour | shape | position | count | all | clipped steps | "
            "median grad norm |\n|---|---|---|---|---|---|---|---|---|")
    print(f"\n## Training settings ({a.max_samples} samples, seed {a.seed}; sampler {DEFAULT})\n")
    print(head.format("variant"))
    for name, r in results.items():
        print(row(name, r, DEFAULT))
    print(f"\nchance (shuffled captions, base): all {chance['all']:.2f}, colour {chance['color']:.2f}")
    if "base" in results and not a.quick:
        print("\n## Sampler settings (base run)\n")
        print(head.format("sampler"))
        for name in SAMPLERS:
            print(row(name, results["base"], name))
    return 0


if __name__ == "__main__":
    sys.exit(main())
