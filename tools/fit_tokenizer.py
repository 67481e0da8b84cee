"""Fit the demo's patch k-means image tokenizer on synthetic images (CPU, well under 2 minutes).

    python tools/fit_tokenizer.py --out runs/tokenizer --resolution 64 --patch 8 --codes 512
"""
from __future__ import annotations

import argparse
import time

import torch

from vqd_scale.data.synthetic import synthetic_images
from vqd_scale.models.vqvae import KMeansTokenizer


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="tokenizer directory to write")
    ap.add_argument("--resolution", type=int, default=64)
    ap.add_argument("--patch", type=int, default=8, help="pixels per token side")
    ap.add_argument("--codes", type=int, default=512, help="k-means centroids before pruning")
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--two-object-prob", type=float, default=0.3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--name", default="synthetic-kmeans")
    ap.add_argument("--preview", default=None, help="optional PNG: originals (top) vs decoded (bottom)")
    a = ap.parse_args(argv)
    t0 = time.time()
    torch.manual_seed(a.seed)
    images = synthetic_images(a.images, a.resolution, a.seed, a.two_object_prob)
    tok = KMeansTokenizer.fit(images, patch=a.patch, num_codes=a.codes, seed=a.seed, name=a.name)
    tok.resolution = a.resolution  # vqd-extract's default --resolution
    tok.save(a.out)
    recon = tok.decode(tok.encode(images[:8]))
    mse = float(((recon - images[:8]) ** 2).mean())
    if a.preview:
        from PIL import Image
        grid = torch.cat([torch.cat(list(images[:8]), 2), torch.cat(list(recon), 2)], 1)  # [3, 2R, 8R]
        Image.fromarray(((grid.permute(1, 2, 0) + 1) * 127.5).clamp(0, 255).byte().numpy()).save(a.preview)
    print(f"tokenizer {tok.tokenizer_id}: K={tok.num_classes} grid={tok.token_shape(a.resolution)} "
          f"recon mse={mse:.4f} ({time.time() - t0:.1f}s) → {a.out}")


if __name__ == "__main__":
    main()
