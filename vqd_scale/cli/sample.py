"""`vqd-sample`: prompts → PNGs + a grid, from a run checkpoint (EMA weights) or weights + config.

    vqd-sample --checkpoint RUN/checkpoints/step_N --image-tokenizer TOKDIR --prompt "a cat" --out samples/
    vqd-sample --weights W.safetensors --config RUN/config.yaml --image-tokenizer TOKDIR --prompts-file p.txt
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


def load_model(a):
    """(RunConfig, transformer on device, config path) from --checkpoint or --weights/--config."""
    from vqd_scale.cli import weights_and_config
    from vqd_scale.families import load_config
    from vqd_scale.interop.pipeline import with_num_classes
    from vqd_scale.models.transformer import VQDiffusionTransformer
    sd, config = weights_and_config(a.checkpoint, a.weights, a.config, which="ema")
    cfg = load_config(config)
    cfg.model = with_num_classes(cfg.model, sd)
    model = VQDiffusionTransformer(cfg.model)
    model.load_state_dict(sd, strict=True)
    return cfg, model.to(a.device).eval(), config


def main(argv=None) -> int:
    a = parse_args(argv)
    try:
        prompts = list(a.prompt)
        if a.prompts_file:
            prompts += [ln.strip() for ln in Path(a.prompts_file).read_text().splitlines() if ln.strip()]
        if not prompts:
            raise UserError("no prompts: pass --prompt TEXT or --prompts-file FILE")
    except UserError as e:
        print(f"vqd-sample: {e}", file=sys.stderr)
        return 2
    from PIL import Image
    from tqdm import tqdm

    from vqd_scale.cli import text_encoder_for
    from vqd_scale.config import SamplerConfig
    from vqd_scale.diffusion.discrete import MaskAndReplace
    from vqd_scale.eval.plots import save_grid, to_uint8
    from vqd_scale.generate import generate
    from vqd_scale.models.vqvae import ImageTokenizer
    try:
        cfg, model, config = load_model(a)
        text = text_encoder_for(cfg.text, config, a.device)
        image_tok = ImageTokenizer.load(a.image_tokenizer, device=a.device)
        if image_tok.num_classes != model.num_classes:
            raise UserError(f"image tokenizer has K={image_tok.num_classes}, the model {model.num_classes}")
    except UserError as e:
        print(f"vqd-sample: {e}", file=sys.stderr)
        return 2
    diffusion = MaskAndReplace(cfg.diffusion, model.num_classes)
    scfg = SamplerConfig(steps=a.steps, guidance_scale=a.guidance, truncation_rate=a.truncation,
                         purity=a.purity, purity_temperature=a.purity_temperature, batch_size=a.batch)
    gen = torch.Generator(a.device).manual_seed(a.seed)
    amp = torch.bfloat16 if a.device.startswith("cuda") else None
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    images = []
    for i in tqdm(range(0, len(prompts), a.batch), desc="batches"):
        chunk = prompts[i:i + a.batch]
        ids = generate(model, text, diffusion, text.tokenize(chunk), scfg, gen, autocast_dtype=amp)
        imgs = image_tok.decode(ids.view(-1, model.cfg.height, model.cfg.width)).float().cpu()  # [b,3,H,W] in [-1,1]
        for j, img in enumerate(to_uint8(imgs)):
            Image.fromarray(img).save(out / f"{i + j:05d}.png")
        images.append(imgs)
    save_grid(torch.cat(images), out / "grid.png")
    (out / "prompts.txt").write_text("\n".join(prompts) + "\n")
    print(f"wrote {len(prompts)} images and grid.png to {out} ({dataclasses.asdict(scfg)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
