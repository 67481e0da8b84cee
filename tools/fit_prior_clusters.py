#!/usr/bin/env python
"""Fit the shifted prior's mixture: streaming k-means over token shards' CLIP image embeddings.

    python tools/fit_prior_clusters.py --shards 'data/cc15m/{00000..00099}.tar' \
        --manifest data/cc15m/manifest.json --k 1024 --out data/cc15m/prior_clusters_k1024.safetensors

Writes means [k,E], per-dim stds [k,E] and counts [k] to a .safetensors whose metadata names the
data (manifest sha256, tokenizer id, shard pattern); set `shifted.clusters` to the output file.
"""
from __future__ import annotations

import argparse
import sys

from vqd_scale.data.clusters import fit_clusters, iter_image_embeddings, manifest_identity, save_clusters


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shards", required=True, help="braceexpand pattern of token shards with img.emb.npy")
    ap.add_argument("--manifest", default=None, help="token manifest (its identity goes into the metadata)")
    ap.add_argument("--k", type=int, required=True, help="number of components (1024 in the release)")
    ap.add_argument("--out", required=True, help="output .safetensors")
    ap.add_argument("--chunk", type=int, default=8192, help="embeddings per k-means step")
    ap.add_argument("--max-samples", type=int, default=None, help="use only the first N embeddings")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    if not a.out.endswith(".safetensors"):
        ap.error("--out must end in .safetensors")
    if a.max_samples is not None and a.max_samples < 1:  # 0 embeddings left k-means unfitted (AttributeError)
        ap.error(f"--max-samples={a.max_samples}: must be >= 1 (leave it out to use every embedding)")
    chunk = max(a.chunk, 3 * a.k)
    clusters = fit_clusters(lambda: iter_image_embeddings(a.shards, chunk), a.k, a.seed, a.max_samples)
    meta = {"shards": a.shards, "seed": a.seed, "num_samples": int(clusters["counts"].sum()), **manifest_identity(a.manifest)}
    save_clusters(a.out, clusters, meta)
    n = clusters["counts"]
    print(f"wrote {a.out}: k={a.k} E={clusters['means'].shape[1]} from {int(n.sum())} embeddings; "
          f"members per component min {int(n.min())} median {int(n.median())} max {int(n.max())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
