"""`vqd-sample`: prompts (or images) → PNGs + a grid, through the model-family registry.

    vqd-sample --checkpoint RUN/checkpoints/step_N --image-tokenizer TOKDIR --prompt "a cat" --out samples/
    vqd-sample --weights W.safetensors --config RUN/config.yaml --image-tokenizer TOKDIR --prompts-file p.txt
    vqd-sample --prior PRIOR_RUN --decoder DECODER_RUN --image-tokenizer TOKDIR --prompt "a cat"   # Corgi chain
    vqd-sample --decoder DECODER_RUN --image-tokenizer TOKDIR --image cat.png --variations 4      # variations
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import torch

from vqd_scale.errors import UserError


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="vqd-sample", description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", help="complete checkpoint dir (EMA weights; config from RUN_DIR/config.yaml)")
    p.add_argument("--weights", help=".safetensors of the transformer (with --config)")
    p.add_argument("--config", help="run config.yaml")
    p.add_argument("--prior", help="prior run dir or checkpoint (task=prior): text → CLIP image embedding")
    p.add_argument("--decoder", help="decoder run dir or checkpoint (task=decoder): CLIP image embedding → image")
    p.add_argument("--image", action="append", default=[], help="with --decoder: an image to make variations of")
    p.add_argument("--variations", type=int, default=4, help="samples per --image")
    p.add_argument("--clip-model", help="open_clip name of the embedding CLIP (default: the decoder's manifest)")
    p.add_argument("--clip-pretrained", help="its local weights (default: the decoder's manifest)")
    p.add_argument("--prior-steps", type=int,
                   help="prior sampling steps (default: the prior run's shifted.sample_steps)")
    p.add_argument("--guide-on", choices=("image", "text", "both"),
                   help="conditions the decoder's unconditional branch nulls (default: decoder.guidance_drops)")
    p.add_argument("--image-tokenizer", required=True, help="tokenizer dir (ImageTokenizer.save) for decoding")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    p.add_argument("--prompts-file", help="one prompt per line")
    p.add_argument("--out", default="samples")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--guidance", type=float, default=1.0)
    p.add_argument("--truncation", type=float, default=1.0)
    p.add_argument("--purity", action="store_true")
    p.add_argument("--purity-temperature", type=float, default=0.0)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p.parse_args(argv)


def _need(sampler, mode: str, flag: str, cfg) -> None:
    """Refuse a run whose family cannot do what its flag asks, by name."""
    if mode not in sampler.modes:
        raise UserError(f"{flag}: its run is task={cfg.task!r}, which does {', '.join(sorted(sampler.modes))}, "
                        f"not {mode}")


def _embedder(a, dcfg, pcfg, device):
    """The CLIP model whose embedding space the decoder (and prior) were trained in: --clip-model, else the
    decoder run's token manifest; a prior trained on another CLIP is refused."""
    from vqd_scale.data.embed import ClipEmbedder
    from vqd_scale.data.schema import manifest_of_sources

    if a.clip_model:
        return ClipEmbedder.from_manifest({"embedding_model": {"model": a.clip_model, "pretrained": a.clip_pretrained}},
                                          device)
    m, where = manifest_of_sources(dcfg.data)
    if m is None:
        raise UserError(f"the decoder run's data manifest is not found ({dcfg.data.manifest or 'data.sources'}); "
                        "name its CLIP with --clip-model/--clip-pretrained")
    if pcfg is not None:
        pm, pwhere = manifest_of_sources(pcfg.data)
        clip_of = lambda man: (man.get("embedding_model") or {}).get("model")  # noqa: E731
        if pm is not None and clip_of(pm) != clip_of(m):
            raise UserError(f"the prior was trained on {pm.get('embedding_model')} embeddings ({pwhere}) but the "
                            f"decoder on {m.get('embedding_model')} ({where}); pair runs of one CLIP")
    return ClipEmbedder.from_manifest(m, device, where)


def _chain(a, prompts, scfg, gen):
    """(images F[n,3,H,W], labels, tokenizer grid): prompts → prior → decoder, or images → CLIP → decoder."""
    from vqd_scale.families import load_sampler, sampler_from
    from vqd_scale.families.base import EMBEDDING_TO_TOKENS, TEXT_TO_EMBEDDING, TEXT_TO_TOKENS

    if not a.decoder:
        from vqd_scale.cli import weights_and_config
        from vqd_scale.families import load_config
        if a.prior:
            raise UserError("--prior needs --decoder: the prior makes CLIP image embeddings, the decoder images")
        sd, config = weights_and_config(a.checkpoint, a.weights, a.config, which="ema")
        cfg = load_config(config)
        model = sampler_from(cfg, sd, a.device, config.parent)
        if TEXT_TO_TOKENS not in model.modes:
            use = ("--decoder RUN (with --prior RUN or --image PATH)" if EMBEDDING_TO_TOKENS in model.modes
                   else "--prior RUN --decoder RUN")
            raise UserError(f"--checkpoint/--weights: task={cfg.task!r} does not turn text into an image; use {use}")
        return model.tokens_from_text(model.text.tokenize(prompts), scfg, gen), prompts, model
    if a.checkpoint or a.weights:
        raise UserError("give --checkpoint/--weights (a text→image model) or --decoder, not both")
    dcfg, dec = load_sampler(a.decoder, a.device)
    _need(dec, EMBEDDING_TO_TOKENS, "--decoder", dcfg)
    if bool(a.prior) == bool(a.image):
        raise UserError("--decoder needs exactly one of --prior RUN (with prompts) or --image PATH (variations)")
    pcfg = prior = None
    if a.prior:
        pcfg, prior = load_sampler(a.prior, a.device)
        _need(prior, TEXT_TO_EMBEDDING, "--prior", pcfg)
        if prior.embed_dim != dec.embed_dim:
            raise UserError(f"the prior emits {prior.embed_dim}-d embeddings, the decoder reads {dec.embed_dim}-d")
    clip = _embedder(a, dcfg, pcfg, a.device)
    if prior is not None:  # text → the prior's text-chosen component, shifted sampling → embedding
        emb = prior.embeddings_from_text(prior.text.tokenize(prompts), clip.embed_texts(prompts), gen, a.prior_steps)
        labels = prompts
    else:  # image → its CLIP embedding, `--variations` samples each
        if a.variations < 1:
            raise UserError("--variations must be >= 1")
        emb = clip.embed_images(torch.cat([_read_image(p) for p in a.image])).repeat_interleave(a.variations, 0)
        labels = [f"{Path(p).name} #{i}" for p in a.image for i in range(a.variations)]
        prompts = [""] * len(labels)
    text = dec.text.tokenize(prompts) if dec.text is not None and any(prompts) else None
    return dec.tokens_from_embeddings(emb, text, scfg, gen, a.guide_on), labels, dec


def _read_image(path: str) -> torch.Tensor:
    """An image file → F[1,3,H,W] in [-1,1]."""
    import numpy as np
    from PIL import Image

    if not Path(path).is_file():
        raise UserError(f"--image {path}: no such file")
    with Image.open(path) as img:
        arr = np.asarray(img.convert("RGB"), dtype=np.float32)
    return torch.from_numpy(arr).permute(2, 0, 1).unsqueeze(0) / 127.5 - 1


def main(argv=None) -> int:
    a = parse_args(argv)
    from PIL import Image

    from vqd_scale.config import SamplerConfig
    from vqd_scale.eval.plots import save_grid, to_uint8
    from vqd_scale.models.vqvae import ImageTokenizer
    scfg = SamplerConfig(steps=a.steps, guidance_scale=a.guidance, truncation_rate=a.truncation,
                         purity=a.purity, purity_temperature=a.purity_temperature, batch_size=a.batch)
    gen = torch.Generator(a.device).manual_seed(a.seed)
    try:
        prompts = list(a.prompt)
        if a.prompts_file:
            prompts += [ln.strip() for ln in Path(a.prompts_file).read_text().splitlines() if ln.strip()]
        if not prompts and not a.image:
            raise UserError("no prompts: pass --prompt TEXT or --prompts-file FILE (or --decoder RUN --image PATH)")
        image_tok = ImageTokenizer.load(a.image_tokenizer, device=a.device)
        ids, labels, model = _chain(a, prompts, scfg, gen)
        if image_tok.num_classes != model.num_classes:
            raise UserError(f"image tokenizer has K={image_tok.num_classes}, the model {model.num_classes}")
    except UserError as e:
        print(f"vqd-sample: {e}", file=sys.stderr)
        return 2
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    imgs = image_tok.decode(ids.view(-1, *model.grid)).float().cpu()  # [n,3,H,W] in [-1,1]
    for i, img in enumerate(to_uint8(imgs)):
        Image.fromarray(img).save(out / f"{i:05d}.png")
    save_grid(imgs, out / "grid.png")
    (out / "prompts.txt").write_text("\n".join(labels) + "\n")
    print(f"wrote {len(labels)} images and grid.png to {out} ({dataclasses.asdict(scfg)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
