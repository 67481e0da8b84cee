#!/usr/bin/env python
"""Shifted-diffusion ablation in miniature: DDPM vs shifted (k = 1, 16, 64, learnable) on the same budget.

A synthetic world with the geometry the paper relies on (see `World`): unit-norm CLIP-like image and
text embeddings in E = 64 dims, images in a narrow cone (random pairs cos ≈ 0.5) around 16 concepts,
texts in their own cone across a modality gap (matched text–image cos ≈ 0.3, unmatched ≈ 0.15), and
p(image | text) broad: the caption fixes the concept and half of the detail, the rest is free.
Each variant trains the real prior (`TrainablePrior`, the debug size) for the same steps and batch with
the released optimiser; mixtures come from `fit_clusters` on the training images. Per step count
(8 as released, 64 as in the paper's ablation) it reports, over held-out pairs:
- cos(gen, true): the paper's metric; it rewards the conditional mean over real samples;
- energy score ‖g − y‖ − ½‖g − g′‖ (g, g′ two samples for one text, y the true image, unit vectors):
  a strictly proper score, lowest for samples drawn from p(image | text); lower is better;
- cos(two samples): diversity (1 = the sampler always returns the same embedding);
- the unrelated-caption control: cos(generated from another pair's caption, true image).
The JSON rows add diagnostics: grad norm and clipped fraction, the data's RMS in the shifted frame
(y0_rms), how often the caption picks the image's own cluster (route_acc), and `denoiser_probe`.

    OMP_NUM_THREADS=1 python bench/shifted_ablation.py [--steps 1500] [--seeds 0] [--kappa 5]
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
import torch.nn.functional as F

from vqd_scale.config import PriorConfig, ShiftedDiffusionConfig
from vqd_scale.data.clusters import fit_clusters, text_routed_stats
from vqd_scale.diffusion.shifted import ShiftedGaussianDiffusion
from vqd_scale.families.prior.task import TrainablePrior, sample_embeddings

E, CONCEPTS, DETAIL = 64, 16, 8
# squared shares of each part in the unnormalised embeddings (they are orthogonal, so the shares are the
# cosines): image = cone 0.5 + concept 0.2 + captioned detail 0.1 + free detail 0.15 + noise 0.05, so random
# images have cos ≈ 0.5, one concept ≈ 0.7, one caption ≈ 0.8; text = cone 0.5 + concept 0.04 + detail 0.04
# + wording 0.42, the text cone at cos 0.3 to the image cone (the modality gap)
IMG = dict(cone=0.5, concept=0.2, detail=0.1, free=0.15, noise=0.05)
TXT = dict(cone=0.5, concept=0.04, detail=0.04, wording=0.42)
GAP = 0.3


class World:
    """The fixed directions of the synthetic CLIP (seeded); `pairs` draws (image, text) embeddings."""

    def __init__(self, seed: int = 1234):
        g = torch.Generator().manual_seed(seed)
        basis, _ = torch.linalg.qr(torch.randn(E, E, generator=g))  # orthonormal columns
        b = basis.T
        self.txt_cone, self.concepts = b[0], b[1:1 + CONCEPTS]
        self.detail = b[17:17 + DETAIL]  # shared by text and image: CLIP aligns what a caption says
        self.wording = b[25:25 + DETAIL]  # text only, orthogonal to the rest: the text pins (concept, detail)
        self.img_cone = GAP * b[0] + (1 - GAP ** 2) ** 0.5 * b[33]
        self.free = F.normalize(torch.randn(DETAIL, E, generator=g), dim=-1)  # image detail no caption names

    def pairs(self, n: int, seed: int, redraw: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(image [n,E], text [n,E]) unit vectors; `redraw` redraws only what the caption leaves free: an exact
        draw from p(image | text), the oracle a perfect prior would match."""
        g = torch.Generator().manual_seed(seed)
        k = torch.randint(0, CONCEPTS, (n,), generator=g)
        u, w = torch.randn(n, DETAIL, generator=g), torch.randn(n, DETAIL, generator=g)
        v, eps = torch.randn(n, DETAIL, generator=g), torch.randn(n, E, generator=g)
        if redraw is not None:
            r = torch.Generator().manual_seed(redraw)
            v, eps = torch.randn(n, DETAIL, generator=r), torch.randn(n, E, generator=r)
        cap = u @ self.detail / DETAIL ** 0.5  # E|cap|² = 1
        img = (IMG["cone"] ** 0.5 * self.img_cone + IMG["concept"] ** 0.5 * self.concepts[k]
               + IMG["detail"] ** 0.5 * cap + IMG["free"] ** 0.5 * v @ self.free / DETAIL ** 0.5
               + IMG["noise"] ** 0.5 * eps / E ** 0.5)
        txt = (TXT["cone"] ** 0.5 * self.txt_cone + TXT["concept"] ** 0.5 * self.concepts[k]
               + TXT["detail"] ** 0.5 * cap + TXT["wording"] ** 0.5 * w @ self.wording / DETAIL ** 0.5)
        return F.normalize(img, dim=-1), F.normalize(txt, dim=-1)


def energy_score(g: torch.Tensor, g2: torch.Tensor, y: torch.Tensor) -> float:
    """Mean over pairs of ‖g − y‖ − ½‖g − g′‖ on unit vectors (Gneiting & Raftery 2007; lower is better)."""
    return ((g - y).norm(dim=-1) - 0.5 * (g - g2).norm(dim=-1)).mean().item()


def train_variant(name: str, args, data, seed: int, shifted: bool, k: int, learnable: bool = False) -> dict:
    """Train one prior on `data` (img, txt, test_img, test_txt), sample the test texts, return the scores."""
    img, txt, test_img, test_txt = data
    torch.manual_seed(seed)
    cfg = PriorConfig(size="debug", embed_dim=E, context_dim=E, context_len=1, num_components=k,
                      dim=args.dim, heads=4, layers=args.layers)
    scfg = ShiftedDiffusionConfig(shifted=shifted, text_dropout=0.1, sample_variance=args.variance,
                                  kappa=args.kappa, learnable_mixture=learnable, p2_weighting=not args.no_p2,
                                  p2_target=args.p2_target, mixture_lr_scale=args.mixture_lr_scale)
    model = TrainablePrior(cfg, scfg)
    out = {"variant": name, "seed": seed}
    if shifted:
        cl = fit_clusters(lambda: iter(img.split(2048)), k, seed=seed)
        stds = text_routed_stats(cl["means"], cl["stds"], [(img, txt)])["routed_stds"] if args.stds == "routed" \
            else cl["stds"]
        model.load_clusters(cl["means"], stds)
        c, mu, sd, _ = model.mixture(model.to_prior_space(txt))
        y0 = (model.to_prior_space(img) - mu) / (args.kappa * sd)  # the data in the shifted frame (DDPM's y)
        out["y0_rms"] = round(y0.pow(2).mean().sqrt().item(), 3)
        own = torch.cdist(img, F.normalize(cl["means"], dim=-1)).argmin(1)  # the image's own k-means cluster
        out["route_acc"] = round((c == own).float().mean().item(), 3)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.96), weight_decay=0.06, eps=1e-6)
    g = torch.Generator().manual_seed(seed)
    diffusion = ShiftedGaussianDiffusion(scfg)
    norms, t0 = [], time.time()
    model.train()
    for step in range(args.steps):
        for grp in opt.param_groups:
            grp["lr"] = args.lr * min(1.0, (step + 1) / 100)  # warm-up
        idx = torch.randint(0, len(img), (args.batch,), generator=g)
        t = diffusion.sample_t(args.batch, "cpu", g)
        noise = torch.randn(args.batch, E, generator=g)
        drop = torch.rand(args.batch, generator=g) < scfg.text_dropout
        aux = torch.randn(scfg.num_aux_draws, args.batch, E, generator=g) if learnable else None
        loss, _ = model(img[idx], t, noise, txt[idx], txt[idx].unsqueeze(1), drop, aux)  # context: the text emb
        opt.zero_grad(set_to_none=True)
        loss.backward()
        norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0).item())  # release: clip 1.0
        opt.step()
    out.update(train_s=round(time.time() - t0, 1), grad_norm_median=round(float(np.median(norms)), 3),
               clip_frac=round(float(np.mean(np.array(norms) > 1.0)), 3))
    if learnable:  # how far the mixture moved at its 0.01 learning-rate scale, in units of the fitted σ
        mix = model.mixture
        with torch.no_grad():
            out["mixture_dmu_over_sigma"] = round(((mix.means() - mix.base_means) / mix.base_log_stds.exp())
                                                  .pow(2).mean().sqrt().item(), 4)
            out["mixture_dlog_sigma"] = round((mix.stds().log() - mix.base_log_stds).pow(2).mean().sqrt().item(), 4)
    model.eval()
    out.update(denoiser_probe(model, diffusion, test_img, test_txt, seed))
    rolled = test_txt.roll(1, 0)
    for n in args.sample_steps:
        sample = lambda te, s: sample_embeddings(model, diffusion, te, te.unsqueeze(1), n,  # noqa: E731
                                                 torch.Generator().manual_seed(s))
        gen, gen2, gen_u = sample(test_txt, seed + 1), sample(test_txt, seed + 2), sample(rolled, seed + 1)
        out[f"cos@{n}"] = F.cosine_similarity(gen, test_img, dim=-1).mean().item()
        out[f"es@{n}"] = energy_score(gen, gen2, test_img)
        out[f"pair@{n}"] = F.cosine_similarity(gen, gen2, dim=-1).mean().item()
        out[f"unrel@{n}"] = F.cosine_similarity(gen_u, test_img, dim=-1).mean().item()
    return out


@torch.no_grad()
def denoiser_probe(model, diffusion, img: torch.Tensor, txt: torch.Tensor, seed: int) -> dict:
    """Held-out ẑ0 error per dim (prior space) and how much ẑ0 follows z_t: ‖ẑ0(z_t) − ẑ0(z_t′)‖² / ‖z_t − z_t′‖²
    for two noise draws (≈ 1: passes z_t through, 0: ignores it), at t = 0 and at t = 143, the last step of the
    8-step sampler, where the sample's detail (and so its diversity) must come from z_t."""
    z0, te, ctx = model.to_prior_space(img), model.to_prior_space(txt), txt.unsqueeze(1)
    c, mu, sd, _ = model.mixture(te)
    mu, scale = diffusion.frame(mu, sd, z0)
    g, out = torch.Generator().manual_seed(seed + 3), {}
    for tv in (0, 143):
        t = torch.full((len(z0),), tv)
        zt, zt2 = (diffusion.q_sample(z0, t, mu, scale, torch.randn(z0.shape, generator=g)) for _ in range(2))
        p, p2 = (model.denoise(z, t, te, c, ctx) for z in (zt, zt2))
        out[f"x0_mse@t{tv}"] = round((p - z0).pow(2).mean().item(), 4)
        out[f"follows_zt@t{tv}"] = round(((p - p2).pow(2).mean() / (zt - zt2).pow(2).mean()).item(), 3)
    return out


VARIANTS = {  # name → (label, shifted, k, learnable)
    "ddpm": ("DDPM (μ=0, Σ=I)", False, 1, False),
    "k1": ("shifted k=1", True, 1, False),
    "k16": ("shifted k=16", True, 16, False),
    "k64": ("shifted k=64", True, 64, False),
    "k64L": ("shifted k=64 learnable", True, 64, True),
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--variance", default="large", choices=["large", "small"])
    ap.add_argument("--kappa", type=float, default=5.0, help="κ: terminal std = κσ_c (5 as released)")
    ap.add_argument("--stds", default="cluster", choices=["cluster", "routed"],
                    help="σ_c: per-dim std of the k-means cluster (released) or RMS of (image − μ_c) over the "
                         "pairs whose text picks c")
    ap.add_argument("--no-p2", action="store_true", help="unweighted MSE instead of the released P2 weighting")
    ap.add_argument("--p2-target", default="x0", choices=["x0", "eps"],
                    help="P2 weight on the ẑ0 MSE (released) or on the ε MSE (as P2 is defined)")
    ap.add_argument("--mixture-lr-scale", type=float, default=0.01, help="learnable mixture's lr scale (0.01 released)")
    ap.add_argument("--sample-steps", type=int, nargs="+", default=[8, 64])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--json", default=None, help="also write the rows here")
    args = ap.parse_args(argv)
    world = World()
    img, txt = world.pairs(8192, seed=1)
    test_img, test_txt = world.pairs(512, seed=2)
    draws = [world.pairs(512, seed=2, redraw=99 + i)[0] for i in range(64)]
    cos = lambda a, b: F.cosine_similarity(a, b, dim=-1).mean().item()  # noqa: E731
    cmean = F.normalize(torch.stack(draws).mean(0), dim=-1)  # ≈ E[image | text] direction
    print(f"world: cos(image, another image) = {cos(test_img, test_img.roll(1, 0)):.3f}; cos(text, its image) = "
          f"{cos(test_txt, test_img):.3f}, another image = {cos(test_txt, test_img.roll(1, 0)):.3f}")
    print(f"oracle (exact draws from p(image | text)): cos(draw, true) = {cos(draws[0], test_img):.3f}, "
          f"cos(two draws) = {cos(draws[0], draws[1]):.3f}, energy score = "
          f"{energy_score(draws[0], draws[1], test_img):.3f}; the conditional mean: cos = {cos(cmean, test_img):.3f}, "
          f"energy score = {energy_score(cmean, cmean, test_img):.3f}")
    print(f"steps={args.steps} batch={args.batch} lr={args.lr} dim={args.dim} layers={args.layers} "
          f"variance={args.variance} kappa={args.kappa} stds={args.stds} p2={not args.no_p2} p2_target={args.p2_target} "
          f"mixture_lr_scale={args.mixture_lr_scale} seeds={args.seeds}\n")
    rows = []
    for seed in args.seeds:
        for v in args.variants:
            label, shifted, k, learnable = VARIANTS[v]
            rows.append(train_variant(label, args, (img, txt, test_img, test_txt), seed, shifted, k, learnable))
            print(json.dumps(rows[-1]), flush=True)
    n8, n64 = args.sample_steps[0], args.sample_steps[-1]
    cols = [f"cos@{n8}", f"cos@{n64}", f"es@{n8}", f"es@{n64}", f"pair@{n8}", f"pair@{n64}", f"unrel@{n64}"]
    print(f"\n| variant | cos(gen, true) @{n8} | @{n64} | energy score @{n8} | @{n64} | cos(two samples) @{n8} | "
          f"@{n64} | unrelated caption @{n64} |\n|---|---|---|---|---|---|---|---|")
    for name in dict.fromkeys(r["variant"] for r in rows):
        rs = [r for r in rows if r["variant"] == name]
        cells = []
        for key in cols:  # mean ± half the spread over seeds
            v = np.array([r[key] for r in rs])
            cells.append(f"{v.mean():.3f}" + (f" ± {(v.max() - v.min()) / 2:.3f}" if len(v) > 1 else ""))
        print(f"| {name} | " + " | ".join(cells) + " |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
