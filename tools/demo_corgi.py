"""The demo's Corgi stage: text → shifted prior → CLIP image embedding → language-free decoder → image.

    python tools/demo.py --corgi [--corgi-samples 40000] [--corgi-prior-samples 20000]

Runs after the main demo, on its synthetic shards and tokenizer: `vqd-extract --clip-model tiny` (a random
CLIP tower, as bench/corgi_claims.py uses), the prior's mixture and the decoder's embedding standardisation
(tools/fit_prior_clusters.py), `vqd-train configs/tiny_prior.yaml` and `vqd-train configs/tiny_decoder.yaml`
at the demo's sizes, then one chain sample per held-out caption, scored like the main demo's samples.
bench/corgi_claims.py reuses these functions for the paper's claims in miniature.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import demo

# The decoder gets the demo recipe's model and optimiser sizes (not its checkpoint/logging cadence only).
SIZES = [s for s in demo.RECIPE if s.startswith(("model.", "data.batch", "optim.", "checkpoint.", "logging."))]
HW = [f"model.height={demo.RES // demo.PATCH}", f"model.width={demo.RES // demo.PATCH}"]
PRIOR = ["prior.num_components=8", "optim.lr=1e-3", "data.batch_size=64", "checkpoint.every_steps=500",
         "logging.every_steps=50", "shifted.sample_steps=16"]
CLIP_NOTE = ("with the random tiny CLIP the chain is at chance: its image embeddings of these images all lie within "
             "cosine 0.998 of each other, and a prior sample (cosine ≈0.965 to the truth in the bench) is further "
             "from the true embedding than any two images are from each other (docs/results.md, 'Corgi chain in miniature')")


def shards(tokens: Path) -> str:
    """The braceexpand pattern of the demo's token shards in `tokens`."""
    return f"{tokens}/{{00000..{demo.SHARDS - 1:05d}}}.tar"


def extract_clip(raw: Path, tokenizer: Path, out_dir: Path, clip: Path | None = None, extra: list[str] = ()) -> None:
    """`vqd-extract --clip-model tiny` of the demo's raw shards (a given random CLIP file, else a new one)."""
    if (out_dir / "manifest.json").exists():
        return
    demo.sh(sys.executable, "-m", "vqd_scale.cli.extract", "--inputs", str(raw / f"{{00000..{demo.SHARDS - 1:05d}}}.tar"),
            "--out-dir", str(out_dir), "--tokenizer", str(tokenizer), "--resolution", str(demo.RES), "--source",
            "synthetic", "--clip-model", "tiny", *(["--clip-pretrained", str(clip)] if clip else []), *extra,
            "--no-progress")


def fit_embeddings(tokens: Path, out: Path) -> tuple[Path, Path]:
    """(k = 8 mixture for the prior, k = 1 mean/std for the decoder's embed_stats), fitted on `tokens` once."""
    clusters, stats = out / "clusters.safetensors", out / "embed_stats.safetensors"
    for path, k in ((clusters, 8), (stats, 1)):
        if not path.exists():
            demo.sh(sys.executable, "tools/fit_prior_clusters.py", "--shards", shards(tokens), "--manifest",
                    str(tokens / "manifest.json"), "--k", str(k), "--out", str(path), quiet=True)
    return clusters, stats


def train(config: str, tokens: Path, run: Path, samples: int, over: list[str]) -> None:
    """One `vqd-train CONFIG` run on the demo's token shards (resumable: a finished run is skipped)."""
    if (run / "DONE").exists():
        return
    demo.sh(sys.executable, "-m", "vqd_scale.cli.train", config, f"run_dir={run}",
            f'data.sources=[{{name: synthetic, shards: "{shards(tokens)}"}}]', f"data.manifest={tokens}/manifest.json",
            f"max_samples={samples}", *over, "--resume", "auto", quiet=True)


def decoder_overrides(stats: Path) -> list[str]:
    """The decoder at the demo's sizes, its embeddings standardised by the fitted mean/std."""
    return SIZES + HW + [f"decoder.embed_stats={stats}"]


def prior_overrides(clusters: Path) -> list[str]:
    """The tiny prior with the fitted k = 8 mixture."""
    return [f"shifted.clusters={clusters}", *PRIOR]


def embedder(tokens: Path):
    """The CLIP the tokens were extracted with (the one the chain must embed captions and images with)."""
    from vqd_scale.data.embed import ClipEmbedder
    from vqd_scale.data.schema import read_manifest

    return ClipEmbedder.from_manifest(read_manifest(tokens), "cpu")


def decode(tok, ids):
    """Token ids [B, h*w] → images F[B,3,H,W] in [-1,1]."""
    return tok.decode(ids.view(-1, demo.RES // demo.PATCH, demo.RES // demo.PATCH)).float()


def chain_tokens(prior, decoder, captions: list[str], text_emb, sampler, seed: int = 0):
    """(token ids, embeddings) of caption → prior (its text tower, the CLIP text embedding) → decoder."""
    import torch

    emb = prior.embeddings_from_text(prior.text.tokenize(captions), text_emb, torch.Generator().manual_seed(seed + 1))
    return decoder.tokens_from_embeddings(emb, None, sampler, torch.Generator().manual_seed(seed)), emb


def run(out: Path, vqd_acc: dict, t0: float, samples: int, prior_samples: int) -> dict:
    """The Corgi stage after the main demo; prints the chain's accuracy beside `vqd_acc` and returns the figures."""
    import torch

    from vqd_scale.config import SamplerConfig
    from vqd_scale.data.synthetic import attribute_accuracy
    from vqd_scale.eval.plots import save_grid
    from vqd_scale.eval.quality import synthetic_heldout, to_unit
    from vqd_scale.families import load_sampler
    from vqd_scale.models.vqvae import ImageTokenizer

    t1, cfgs, tokens = time.time(), demo.REPO / "configs", out / "tokens_clip"
    demo.stage("corgi 1/4 token extraction with a random tiny CLIP (vqd-extract --clip-model tiny)", t0)
    extract_clip(out / "raw", out / "tokenizer", tokens)
    clusters, stats = fit_embeddings(tokens, out)
    demo.stage(f"corgi 2/4 shifted prior (vqd-train configs/tiny_prior.yaml, {prior_samples} samples)", t0)
    train(str(cfgs / "tiny_prior.yaml"), tokens, out / "prior", prior_samples, prior_overrides(clusters))
    demo.stage(f"corgi 3/4 language-free decoder (vqd-train configs/tiny_decoder.yaml, {samples} samples)", t0)
    train(str(cfgs / "tiny_decoder.yaml"), tokens, out / "decoder", samples, decoder_overrides(stats))
    demo.stage("corgi 4/4 chain sampling (caption → prior → decoder) and attribute accuracy", t0)
    tok = ImageTokenizer.load(out / "tokenizer")
    held = synthetic_heldout(demo.HELDOUT, demo.RES)  # the main demo's held-out captions
    sampler = SamplerConfig(**demo.SAMPLER)
    clip = embedder(tokens)
    text_emb, true_emb = clip.embed_texts(held.captions), clip.embed_images(to_unit(held.images))
    _, prior = load_sampler(out / "prior")
    _, dec = load_sampler(out / "decoder")
    ids, emb = chain_tokens(prior, dec, held.captions, text_emb, sampler)
    chain = decode(tok, ids)
    true = decode(tok, dec.tokens_from_embeddings(true_emb, None, sampler, torch.Generator().manual_seed(0)))
    shuffled = held.captions[1:] + held.captions[:1]  # each image scored against another sample's caption
    res = {"chain": attribute_accuracy(held.captions, chain), "chain_chance": attribute_accuracy(shuffled, chain),
           "true_emb": attribute_accuracy(held.captions, true), "vqd": vqd_acc,
           "prior_cos": float(torch.nn.functional.cosine_similarity(emb, true_emb).mean()),
           "seconds": round(time.time() - t1)}
    real = tok.decode(tok.encode(to_unit(held.images))).float()  # as the main demo's grid
    png = save_grid(chain[:demo.GRID], out / "samples_corgi.png", captions=held.captions[:demo.GRID],
                    references=real[:demo.GRID], scale=4, cols=8, pad=6)
    print(f"\nCorgi chain grid ({demo.GRID} of {demo.HELDOUT} held-out captions; caption → prior → decoder, the "
          f"held-out real image through the tokenizer beside each): {png}")
    print(f"attribute accuracy on the same {demo.HELDOUT} held-out captions ({samples} decoder / {prior_samples} "
          f"prior training samples):")
    print(f"  {'':>8}  {'text-conditioned':>16} {'chain':>6} {'chain, shuffled (chance)':>24} "
          f"{'decoder from true emb':>21}")
    for k in ("color", "shape", "position", "count", "all"):
        print(f"  {k:>8}: {vqd_acc[k]:16.2f} {res['chain'][k]:6.2f} {res['chain_chance'][k]:24.2f} "
              f"{res['true_emb'][k]:21.2f}")
    print(f"prior cos(generated, true image embedding) {res['prior_cos']:.3f}; Corgi stage {res['seconds']}s")
    print(f"note: {CLIP_NOTE}")
    return res
