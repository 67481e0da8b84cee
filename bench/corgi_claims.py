"""The Corgi paper's claims in miniature, on the demo's synthetic world (issue 11 item 6).

    OMP_NUM_THREADS=1 python bench/corgi_claims.py [--out runs/corgi] [--samples 40000] [--prior-samples 20000]

Data: the demo's synthetic shards, k-means tokenizer and `vqd-extract`, with `--clip-model tiny` (a random
CLIP tower: its image embedding is a fixed random function of the image, its text embedding one of the caption),
once fully captioned and once with 90 % of the captions removed (`--keep-uncaptioned`: the prior trains on the
10 % left, the decoder on every image). Runs, every one the real `vqd-train` with the demo recipe's sizes:
  vqd          text-conditioned VQ-Diffusion, `--samples`
  decoder      language-free decoder, `--samples` (equal budget to vqd), embeddings standardised (embed_stats)
  decoder_a25  the same with embedding perturbation α = 0.25
  prior        shifted prior on all captions, `--prior-samples` (mixture: k-means, k = 8)
  prior_ddpm   the DDPM-baseline prior (shifted.shifted=false), same budget
  prior_10pct  shifted prior on the 10 % captioned records, same budget
Scored by attribute accuracy (colour / shape / position / all) of one sample per held-out caption (256, another
seed), the demo's sampler; "decoder (true emb)" decodes the held-out images' own CLIP embeddings (the ceiling the
prior is chasing), "chain" = caption → prior → decoder. Prints a table and writes it as JSON to OUT/claims.json.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))
import demo  # noqa: E402  (tools/demo.py: the stages reused here)
import demo_corgi  # noqa: E402  (tools/demo_corgi.py: the demo's Corgi stage, extraction / fits / training / chain)
from demo_corgi import train  # noqa: E402

CAPTIONED_FRACTION = 0.1


def prepare(out: Path, per_shard: int) -> None:
    """Synthetic shards → tokenizer → tokens with tiny-CLIP embeddings (all captioned, and 10 % captioned)."""
    import webdataset as wds

    py = sys.executable
    if (out / "tok_semi" / "manifest.json").exists():
        return
    demo.sh(py, "tools/make_synthetic.py", "--out", str(out / "raw"), "--shards", str(demo.SHARDS),
            "--per-shard", str(per_shard), "--resolution", str(demo.RES))
    demo.sh(py, "tools/fit_tokenizer.py", "--out", str(out / "tokenizer"), "--resolution", str(demo.RES),
            "--patch", str(demo.PATCH), "--codes", "256", "--images", "2000", "--two-object-prob", "0")
    demo_corgi.extract_clip(out / "raw", out / "tokenizer", out / "tok_all")
    # the same images with 90 % of the captions gone (every record whose index is not a multiple of 10)
    (out / "raw_semi").mkdir(exist_ok=True)
    for s in range(demo.SHARDS):
        src, dst = out / "raw" / f"{s:05d}.tar", out / "raw_semi" / f"{s:05d}.tar"
        with wds.TarWriter(str(dst)) as sink:
            for i, r in enumerate(wds.WebDataset(str(src), shardshuffle=False)):
                r = {k: v for k, v in r.items() if k == "__key__" or not k.startswith("__")}
                if i % round(1 / CAPTIONED_FRACTION):
                    r.pop("txt")
                sink.write(r)
    clip = out / "tok_all" / "clip_tiny_random.pt"  # the same CLIP for both extractions
    demo_corgi.extract_clip(out / "raw_semi", out / "tokenizer", out / "tok_semi", clip, ["--keep-uncaptioned"])


def score(out: Path, runs: Path) -> dict:
    """Attribute accuracy of each model / chain on the held-out captions."""
    import torch

    from vqd_scale.config import SamplerConfig
    from vqd_scale.data.synthetic import attribute_accuracy
    from vqd_scale.eval.quality import sample_accuracy, synthetic_heldout, to_unit
    from vqd_scale.families import load_sampler
    from vqd_scale.models.vqvae import ImageTokenizer

    tok = ImageTokenizer.load(out / "tokenizer")
    held = synthetic_heldout(demo.HELDOUT, demo.RES)
    sampler = SamplerConfig(**demo.SAMPLER)
    clip = demo_corgi.embedder(out / "tok_all")
    text_emb, true_emb = clip.embed_texts(held.captions), clip.embed_images(to_unit(held.images))
    grid = lambda ids: demo_corgi.decode(tok, ids)  # noqa: E731
    acc = lambda ids: attribute_accuracy(held.captions, grid(ids))  # noqa: E731
    rows = {"real images through the tokenizer": attribute_accuracy(held.captions, tok.decode(tok.encode(
        to_unit(held.images))))}
    _, vqd = load_sampler(runs / "vqd")
    res = sample_accuracy(vqd.model, vqd.text, vqd.diffusion, tok, held, sampler)
    rows["vqd (text-conditioned)"], rows["vqd, shuffled captions (chance)"] = res["samples"], res["chance"]
    shuffled = held.captions[1:] + held.captions[:1]  # each image scored against another sample's caption
    cos = {}
    for dec in ("decoder", "decoder_a25"):
        _, d = load_sampler(runs / dec)
        ids = d.tokens_from_embeddings(true_emb, None, sampler, torch.Generator().manual_seed(0))
        rows[f"{dec} (true emb)"] = acc(ids)
        rows[f"{dec} (true emb), shuffled captions (chance)"] = attribute_accuracy(shuffled, grid(ids))
        for prior in ("prior", "prior_ddpm", "prior_10pct"):
            _, p = load_sampler(runs / prior)
            ids, emb = demo_corgi.chain_tokens(p, d, held.captions, text_emb, sampler)
            cos[prior] = float(torch.nn.functional.cosine_similarity(emb, true_emb).mean())
            rows[f"chain {prior} → {dec}"] = acc(ids)
    return {"accuracy": rows, "prior_cos_image": cos}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/corgi")
    ap.add_argument("--samples", type=int, default=40000, help="training samples of vqd and each decoder")
    ap.add_argument("--prior-samples", type=int, default=20000, help="training samples of each prior")
    ap.add_argument("--per-shard", type=int, default=512)
    a = ap.parse_args(argv)
    demo.quiet_env()
    out = (REPO / a.out).resolve() if not Path(a.out).is_absolute() else Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    prepare(out, a.per_shard)
    clusters, stats = demo_corgi.fit_embeddings(out / "tok_all", out)  # the prior's mixture; the decoder's stats
    runs, cfgs = out / "runs", REPO / "configs"
    train(str(cfgs / "tiny.yaml"), out / "tok_all", runs / "vqd", a.samples, demo.RECIPE)
    dec = demo_corgi.decoder_overrides(stats)
    train(str(cfgs / "tiny_decoder.yaml"), out / "tok_all", runs / "decoder", a.samples, dec)
    train(str(cfgs / "tiny_decoder.yaml"), out / "tok_all", runs / "decoder_a25", a.samples,
          dec + ["decoder.perturb_alpha=0.25"])
    prior = demo_corgi.prior_overrides(clusters)
    train(str(cfgs / "tiny_prior.yaml"), out / "tok_all", runs / "prior", a.prior_samples, prior)
    train(str(cfgs / "tiny_prior.yaml"), out / "tok_all", runs / "prior_ddpm", a.prior_samples,
          prior + ["shifted.shifted=false"])
    train(str(cfgs / "tiny_prior.yaml"), out / "tok_semi", runs / "prior_10pct", a.prior_samples, prior)
    res = score(out, runs)
    res.update(samples=a.samples, prior_samples=a.prior_samples, seconds=round(time.time() - t0))
    (out / "claims.json").write_text(json.dumps(res, indent=1))
    print(f"\nattribute accuracy on {demo.HELDOUT} held-out captions ({a.samples} samples per vqd/decoder run, "
          f"{a.prior_samples} per prior; {res['seconds']} s)")
    print(f"{'':44s} {'color':>6} {'shape':>6} {'pos':>6} {'all':>6}")
    for name, r in res["accuracy"].items():
        print(f"{name:44s} {r['color']:6.2f} {r['shape']:6.2f} {r['position']:6.2f} {r['all']:6.2f}")
    cos = ", ".join(f"{k} {v:.3f}" for k, v in res["prior_cos_image"].items())
    print(f"prior cos(generated, true image emb): {cos}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
