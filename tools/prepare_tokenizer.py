"""Turn a pretrained VQ model into a vqd_scale tokenizer fitted to your images (pruning map + report).

    # a diffusers VQModel directory (e.g. the vqvae/ folder of microsoft/vq-diffusion-ithq, downloaded by you)
    python tools/prepare_tokenizer.py --vqmodel models/ithq/vqvae --shards 'data/laion/{00000..00009}.tar' \\
        --resolution 256 --out models/tok_laion
    # a taming-transformers VQGAN checkpoint + its config (converted to a diffusers VQModel on the way)
    python tools/prepare_tokenizer.py --taming-ckpt vqgan/last.ckpt --taming-config vqgan/model.yaml \\
        --shards 'data/laion/{00000..00009}.tar' --resolution 256 --out models/tok_laion

Images are read and preprocessed exactly as vqd-extract does; every tenth one (at most --heldout) is
not used for fitting and measures reconstruction (full vs pruned codebook). Writes OUT/ (ImageTokenizer dir,
resolution recorded as vqd-extract's default) and OUT/prepare_report.json.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from vqd_scale.errors import UserError


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--vqmodel", help="local diffusers VQModel directory (config.json + weights)")
    src.add_argument("--taming-ckpt", help="taming-transformers VQGAN checkpoint (.ckpt/.pth with state_dict)")
    ap.add_argument("--taming-config", help="its YAML config (model.params.ddconfig, n_embed, embed_dim)")
    ap.add_argument("--trust-pickle", action="store_true", help="unpickle a checkpoint holding non-tensor objects")
    ap.add_argument("--shards", required=True, help="img2dataset shards to fit on, e.g. 'data/laion/{00000..00009}.tar'")
    ap.add_argument("--out", required=True, help="tokenizer directory to write")
    ap.add_argument("--resolution", type=int, required=True, help="image side the tokens will be extracted at")
    ap.add_argument("--no-center-crop", action="store_true")
    ap.add_argument("--min-image-size", type=int, default=32)
    ap.add_argument("--max-images", type=int, default=2000, help="images read (held-out ones included)")
    ap.add_argument("--heldout", type=int, default=64, help="at most this many images (every tenth) kept out of "
                    "the fit, for the report")
    ap.add_argument("--min-count", type=int, default=1, help="keep codes used at least this often")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--name", default=None, help="label stored in tokenizer.json (not part of the id)")
    a = ap.parse_args(argv)
    from vqd_scale.data.tokenizer_prep import fit_pruning, shard_images
    from vqd_scale.models.vqvae import VQModelTokenizer

    t0 = time.time()
    try:
        if a.vqmodel:
            tok = VQModelTokenizer.from_diffusers(a.vqmodel, name=a.name)
        else:
            if not a.taming_config:
                ap.error("--taming-ckpt needs --taming-config (the YAML the checkpoint was trained with)")
            from vqd_scale.interop.taming import vqmodel_from_taming
            tok = VQModelTokenizer(vqmodel_from_taming(a.taming_ckpt, a.taming_config, a.trust_pickle),
                                   name=a.name or Path(a.taming_ckpt).stem)
        tok.to(a.device)
        tok.token_shape(a.resolution)  # a resolution the model cannot split fails before any image is read
        images = shard_images(a.shards, a.resolution, not a.no_center_crop, a.min_image_size, a.max_images)
        report = fit_pruning(tok, images, a.heldout, a.min_count, a.batch_size)
    except UserError as e:
        print(f"prepare_tokenizer: {e}", file=sys.stderr)
        return 2
    tok.resolution = a.resolution
    tok.save(a.out)
    report.update(resolution=a.resolution, token_shape=list(tok.token_shape(a.resolution)), shards=a.shards,
                  seconds=round(time.time() - t0, 1))
    (Path(a.out) / "prepare_report.json").write_text(json.dumps(report, indent=1))
    fmt = lambda v: "n/a" if v is None else f"{v:.4g}"  # noqa: E731
    print(f"tokenizer {report['tokenizer_id']} → {a.out}: kept {report['codes_kept']} of {report['codes_total']} "
          f"codes (used ≥{a.min_count}× in {report['fit_images']} images, {report['fit_tokens']} tokens; top 10% of "
          f"codes carry {report['top10pct_codes_token_share']:.0%}); held-out {report['heldout_images']} images: "
          f"recon MSE full {fmt(report['recon_mse_full'])} / pruned {fmt(report['recon_mse_pruned'])} "
          f"(PSNR {fmt(report['psnr_full'])} / {fmt(report['psnr_pruned'])} dB), tokens on pruned codes "
          f"{fmt(report['heldout_tokens_pruned'])}; grid {report['token_shape']} ({report['seconds']}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
