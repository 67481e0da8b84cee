#!/usr/bin/env python
"""Fit the shifted prior's mixture: streaming k-means over token shards' CLIP image embeddings.

    python tools/fit_prior_clusters.py --shards 'data/cc15m/{00000..00099}.tar' \
        --manifest data/cc15m/manifest.json --k 1024 --out data/cc15m/prior_clusters_k1024.safetensors

Writes means [k,E], per-dim stds [k,E] and counts [k] (on the unit sphere; the prior scales them into
its space) to a .safetensors whose metadata names the data (manifest sha256, tokenizer id, shard
pattern); set `shifted.clusters` to the output file. When the shards hold text embeddings it also
routes every pair by its caption (argmax cos(text, μ_c), as the prior does) and prints the RMS of
(e − μ_c)/σ_c: the κ at which the data in the shifted frame is at the noise's scale. `--stds routed`
stores that routed spread as σ_c (then κ = 1 is the matched choice).
"""
from __future__ import annotations

import argparse
import sys

from vqd_scale.data.clusters import (fit_clusters, iter_image_embeddings, iter_pairs, manifest_identity, save_clusters,
                                     shards_have, text_routed_stats)
from vqd_scale.data import schema


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shards", required=True, help="braceexpand pattern of token shards with img.emb.npy")
    ap.add_argument("--manifest", default=None, help="token manifest (its identity goes into the metadata)")
    ap.add_argument("--k", type=int, required=True, help="number of components (1024 in the release)")
    ap.add_argument("--out", required=True, help="output .safetensors")
    ap.add_argument("--chunk", type=int, default=8192, help="embeddings per k-means step")
    ap.add_argument("--max-samples", type=int, default=None, help="use only the first N embeddings")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--stds", choices=["cluster", "routed"], default="cluster",
                    help="σ_c: per-dim std of each k-means cluster (as released, with shifted.kappa=5 there), or the "
                         "per-dim RMS of (e − μ_c) over the pairs whose caption picks c (needs text embeddings; "
                         "use shifted.kappa=1)")
    a = ap.parse_args(argv)
    if not a.out.endswith(".safetensors"):
        ap.error("--out must end in .safetensors")
    if a.max_samples is not None and a.max_samples < 1:  # 0 embeddings left k-means unfitted (AttributeError)
        ap.error(f"--max-samples={a.max_samples}: must be >= 1 (leave it out to use every embedding)")
    chunk = max(a.chunk, 3 * a.k)
    has_text = shards_have(a.shards, schema.TEXT_EMB)
    if a.stds == "routed" and not has_text:
        ap.error("--stds routed needs text embeddings in the shards (vqd-extract --clip-model stores them)")
    clusters = fit_clusters(lambda: iter_image_embeddings(a.shards, chunk), a.k, a.seed, a.max_samples)
    meta = {"shards": a.shards, "seed": a.seed, "num_samples": int(clusters["counts"].sum()), "stds": a.stds,
            **manifest_identity(a.manifest)}
    routed = None
    if has_text:
        pairs = iter_pairs(a.shards, chunk)
        if a.max_samples is not None:
            pairs = _first(pairs, a.max_samples)
        routed = text_routed_stats(clusters["means"], clusters["stds"], pairs)
        meta["y_rms_cluster_stds"] = round(float(routed["y_rms"]), 4)
        meta["caption_picks_own_cluster"] = round(routed["agreement"], 4)
        if a.stds == "routed":
            clusters = {**clusters, "stds": routed["routed_stds"]}
    save_clusters(a.out, clusters, meta)
    n = clusters["counts"]
    print(f"wrote {a.out}: k={a.k} E={clusters['means'].shape[1]} from {int(n.sum())} embeddings ({a.stds} stds); "
          f"members per component min {int(n.min())} median {int(n.median())} max {int(n.max())}")
    if routed is not None:
        unpicked = int((routed["routed_counts"] == 0).sum())
        y = float(routed["y_rms"])
        print(f"routed by caption: {routed['agreement']:.1%} of the captions pick their image's own cluster; the data "
              f"has RMS {y:.3f}/κ in the shifted frame y = (e − μ_c)/(κσ_c) ({y / 5:.3f} at κ = 5, as released; see "
              f"the prior ablation in docs/results.md); {unpicked}/{a.k} components picked by no caption")
    return 0


def _first(pairs, n: int):
    """The (image, text) chunks up to n pairs in all."""
    left = n
    for img, txt in pairs:
        if left <= 0:
            return
        yield img[:left], txt[:left]
        left -= len(img)


if __name__ == "__main__":
    sys.exit(main())
