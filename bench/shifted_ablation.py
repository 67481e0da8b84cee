#!/usr/bin/env python
"""Shifted-diffusion ablation in miniature: plain DDPM vs shifted k=1 vs shifted k=16 (same budget).

Synthetic CLIP-like pairs where the text determines the cluster: 16 cluster centres on the sphere;
image z = normalise(centre + captioned detail + uncaptioned detail + noise)·√E (per-dim std ≈ 1,
so N(0, I) is a fair baseline start); text = normalise(centre + the captioned detail through
another map + a constant modality gap + noise). The uncaptioned detail makes p(z | text) broad,
so a sample is a draw, not a lookup. Each variant trains the real prior (`TrainablePrior`) for the same number
of steps and batch size; mixtures come from `fit_clusters` on the training images. Reports
cosine(generated, true image embedding) at 8 and 64 sampling steps, and the unrelated-caption
control (prediction for the rolled batch vs the true image).

    OMP_NUM_THREADS=1 python bench/shifted_ablation.py [--steps 1500] [--seeds 0]
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
import torch.nn.functional as F

from vqd_scale.config import PriorConfig, ShiftedDiffusionConfig
from vqd_scale.data.clusters import fit_clusters
from vqd_scale.diffusion.shifted import ShiftedGaussianDiffusion
from vqd_scale.tasks.prior import TrainablePrior, sample_embeddings

E, K_TRUE, DETAIL = 32, 16, 8


def make_pairs(n: int, seed: int, world_seed: int = 1234, resample_seed: int | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """(image emb [n,E], text emb [n,E]); the 'world' (centres, maps, gap) is fixed by world_seed.

    resample_seed: redraw only what the caption does not determine (uncaptioned detail, noise), i.e.
    an exact draw from p(image | text): the oracle a perfect prior would match.
    """
    w = torch.Generator().manual_seed(world_seed)
    centres = F.normalize(torch.randn(K_TRUE, E, generator=w), dim=-1)
    p_img, p_txt, p_free = (torch.randn(DETAIL, E, generator=w) / DETAIL ** 0.5 for _ in range(3))
    gap = 0.5 * F.normalize(torch.randn(E, generator=w), dim=0)
    g = torch.Generator().manual_seed(seed)
    k = torch.randint(0, K_TRUE, (n,), generator=g)
    u = torch.randn(n, DETAIL, generator=g)
    v, eps = torch.randn(n, DETAIL, generator=g), torch.randn(n, E, generator=g)  # detail the caption omits
    txt = F.normalize(centres[k] + 0.35 * u @ p_txt + gap + 0.1 * torch.randn(n, E, generator=g), dim=-1)
    if resample_seed is not None:
        r = torch.Generator().manual_seed(resample_seed)
        v, eps = torch.randn(n, DETAIL, generator=r), torch.randn(n, E, generator=r)
    img = F.normalize(centres[k] + 0.35 * u @ p_img + 0.35 * v @ p_free + 0.08 * eps, dim=-1) * E ** 0.5
    return img, txt


def train_variant(name: str, shifted: bool, k: int, img, txt, args, seed: int) -> dict:
    torch.manual_seed(seed)
    cfg = PriorConfig(size="debug", embed_dim=E, context_dim=E, context_len=1, num_components=k,
                      dim=args.dim, heads=4, layers=args.layers)
    scfg = ShiftedDiffusionConfig(shifted=shifted, text_dropout=0.1, sample_variance=args.variance, kappa=args.kappa)
    model = TrainablePrior(cfg, scfg)
    if shifted:
        cl = fit_clusters(lambda: iter(img.split(2048)), k, seed=seed)
        model.mixture.load_clusters(cl["means"], cl["stds"])
    # release recipe (AdamW β (0.9, 0.96), wd 0.06, eps 1e-6, clip 1.0) at a tiny-model learning rate
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.96), weight_decay=0.06, eps=1e-6)
    g = torch.Generator().manual_seed(seed)
    diffusion = ShiftedGaussianDiffusion(scfg)
    t0 = time.time()
    model.train()
    for step in range(args.steps):
        lr = args.lr * min(1.0, (step + 1) / 100)  # warm-up
        for grp in opt.param_groups:
            grp["lr"] = lr
        idx = torch.randint(0, len(img), (args.batch,), generator=g)
        z0, te = img[idx], txt[idx]
        t = diffusion.sample_t(args.batch, "cpu", g)
        noise = torch.randn(z0.shape, generator=g)
        drop = torch.rand(args.batch, generator=g) < scfg.text_dropout
        loss, _ = model(z0, t, noise, te, te.unsqueeze(1), drop)  # context: the text embedding as one token
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    train_s = time.time() - t0
    model.eval()
    test_img, test_txt = args.test
    out = {"variant": name, "train_s": round(train_s, 1), "final_loss": round(loss.item(), 4)}
    for steps in (8, 64):
        gen = sample_embeddings(model, diffusion, test_txt, test_txt.unsqueeze(1), steps,
                                torch.Generator().manual_seed(seed + 1))
        rolled = test_txt.roll(1, 0)
        gen_u = sample_embeddings(model, diffusion, rolled, rolled.unsqueeze(1), steps,
                                  torch.Generator().manual_seed(seed + 1))
        gen2 = sample_embeddings(model, diffusion, test_txt, test_txt.unsqueeze(1), steps,
                                 torch.Generator().manual_seed(seed + 2))
        out[f"cos_img@{steps}"] = F.cosine_similarity(gen, test_img, dim=-1).mean().item()
        out[f"cos_pair@{steps}"] = F.cosine_similarity(gen, gen2, dim=-1).mean().item()  # 1 = no diversity
        out[f"cos_unrel@{steps}"] = F.cosine_similarity(gen_u, test_img, dim=-1).mean().item()
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--variance", default="large", choices=["large", "small"])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--kappa", type=float, default=5.0, help="κ: terminal std = κσ_c (5 as released)")
    ap.add_argument("--variants", nargs="+", default=["ddpm", "k1", "k16"], choices=["ddpm", "k1", "k16"])
    ap.add_argument("--json", default=None, help="also write the rows here")
    args = ap.parse_args(argv)
    img, txt = make_pairs(8192, seed=1)
    args.test = make_pairs(512, seed=2)
    base = F.cosine_similarity(args.test[0], args.test[0].roll(1, 0), dim=-1)  # chance level between pairs
    draws = [make_pairs(512, seed=2, resample_seed=99 + i)[0] for i in range(64)]
    oracle = F.cosine_similarity(draws[0], args.test[0], dim=-1)  # one exact draw from p(image | text)
    oracle_pair = F.cosine_similarity(draws[0], draws[1], dim=-1)  # two draws for one text
    oracle_mean = F.cosine_similarity(torch.stack(draws).mean(0), args.test[0], dim=-1)  # ≈ E[image | text]
    rows = []
    for seed in args.seeds:
        variants = {"ddpm": ("DDPM (μ=0, Σ=I)", False, 1), "k1": (f"shifted k=1, κ={args.kappa:g}", True, 1),
                    "k16": (f"shifted k=16, κ={args.kappa:g}", True, 16)}
        for name, shifted, k in (variants[v] for v in args.variants):
            r = train_variant(name, shifted, k, img, txt, args, seed)
            r["seed"] = seed
            rows.append(r)
            print(json.dumps(r), flush=True)
    print(f"\nreference: cos(true image, another pair's true image) = {base.mean().item():.3f}")
    print(f"oracle (exact draws from p(image | text)): cos(draw, true) = {oracle.mean().item():.3f}, "
          f"cos(draw, draw) = {oracle_pair.mean().item():.3f}; "
          f"cos(E[image | text] from 64 draws, true) = {oracle_mean.mean().item():.3f}")
    print(f"steps={args.steps} batch={args.batch} lr={args.lr} dim={args.dim} layers={args.layers} "
          f"variance={args.variance} kappa={args.kappa} seeds={args.seeds}\n")
    cols = ("cos_img@8", "cos_img@64", "cos_unrel@8", "cos_unrel@64", "cos_pair@8", "cos_pair@64")
    print("| variant | cos(gen, true) @8 | @64 | unrelated caption @8 | @64 | cos(two samples) @8 | @64 | train s |")
    print("|---|---|---|---|---|---|---|---|")
    for name in dict.fromkeys(r["variant"] for r in rows):
        rs = [r for r in rows if r["variant"] == name]
        cells = []
        for k in cols:  # mean ± half the spread over seeds
            v = np.array([r[k] for r in rs])
            cells.append(f"{v.mean():.3f}" + (f" ± {(v.max() - v.min()) / 2:.3f}" if len(v) > 1 else ""))
        print(f"| {name} | " + " | ".join(cells) + f" | {np.mean([r['train_s'] for r in rs]):.0f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
