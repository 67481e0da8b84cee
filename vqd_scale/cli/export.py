"""`vqd-export`: our weights → a diffusers VQDiffusionPipeline directory, or a diffusers/official model → our weights.

    vqd-export to-diffusers --checkpoint RUN/checkpoints/step_N --image-tokenizer TOKDIR --out DIR
    vqd-export to-diffusers --weights W.safetensors --config RUN/config.yaml --image-tokenizer TOKDIR --out DIR
    vqd-export import SRC(diffusers dir | official .pth) --out W.safetensors   (writes W.yaml: model config)
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from omegaconf import OmegaConf
from vqd_scale.errors import UserError


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="vqd-export", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("to-diffusers", help="write a VQDiffusionPipeline directory")
    e.add_argument("--checkpoint", help="a complete checkpoint dir (uses its EMA weights and the run's config.yaml)")
    e.add_argument("--weights", help="a .safetensors of the trainable module (with --config)")
    e.add_argument("--config", help="the run's config.yaml (default: RUN_DIR/config.yaml of --checkpoint)")
    e.add_argument("--which", default="ema", choices=("ema", "model"), help="checkpoint weights to export")
    e.add_argument("--image-tokenizer", required=True, help="image tokenizer dir (ImageTokenizer.save) or VQModel dir")
    e.add_argument("--out", required=True)
    i = sub.add_parser("import", help="diffusers dir or official .pth → our weights")
    i.add_argument("src")
    i.add_argument("--out", required=True, help="output .safetensors; the model config goes next to it (.yaml)")
    i.add_argument("--no-ema", action="store_true", help="official .pth: use raw instead of EMA weights")
    i.add_argument("--heads", type=int, default=16, help="official .pth: attention heads (not stored in it)")
    return p.parse_args(argv)


def _to_diffusers(a) -> Path:
    from vqd_scale import families
    from vqd_scale.cli import text_encoder_for, weights_and_config
    from vqd_scale.models.vqvae import ImageTokenizer
    sd, config = weights_and_config(a.checkpoint, a.weights, a.config, which=a.which)
    cfg = families.load_config(config)
    export = families.get(cfg.task).export
    if export is None:
        raise UserError(f"task={cfg.task} has no diffusers export (diffusers has no pipeline for it); "
                        "families with one: " + ", ".join(f.name for f in families.FAMILIES.values() if f.export))
    text = text_encoder_for(cfg.text, config)
    out = export(a.out, sd, cfg, text, ImageTokenizer.load(a.image_tokenizer))
    print(f"wrote {out} (load with diffusers.VQDiffusionPipeline.from_pretrained)")
    return out


def _import(a) -> Path:
    from safetensors.torch import save_file
    src, out = Path(a.src), Path(a.out)
    if src.is_file():
        from vqd_scale.interop.official import load_official
        cfg, sd = load_official(src, use_ema=not a.no_ema, heads=a.heads)
    else:
        from vqd_scale.interop.pipeline import import_pipeline_dir
        cfg, sd = import_pipeline_dir(src)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous().float() for k, v in sd.items()}, str(out))
    (out.with_suffix(".yaml")).write_text(OmegaConf.to_yaml({"model": dataclasses.asdict(cfg)}))
    print(f"wrote {out} and {out.with_suffix('.yaml')} (use as checkpoint.init_from plus the model section)")
    return out


def main(argv=None) -> int:
    a = parse_args(argv)
    try:
        (_to_diffusers if a.cmd == "to-diffusers" else _import)(a)
    except UserError as e:
        print(f"vqd-export: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
