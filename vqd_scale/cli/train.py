"""`vqd-train CONFIG [key=value ...] [--resume auto|none|PATH] [--init-from PATH]`.

Works as one plain process, under `torchrun` and under `srun` (see vqd_scale/distributed.py). The config
is parsed and validated (and a resume checkpoint checked) before any process group starts, so a bad
value fails fast with a message instead of hanging the other ranks.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from vqd_scale.errors import UserError
from vqd_scale.train import signals

DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="vqd-train", description=__doc__.splitlines()[0])
    p.add_argument("config", nargs="?", default=None,
                   help="YAML config (default: configs/tiny.yaml); later dotted overrides win")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=1e-4 deepspeed.zero_stage=3")
    p.add_argument("--resume", default=None, help="auto (newest complete checkpoint) | none | PATH "
                   "(default: checkpoint.resume from the config)")
    p.add_argument("--init-from", default=None, help="initial weights only: .safetensors or a checkpoint dir (EMA)")
    p.add_argument("--families", action="store_true", help="list the model families (config `task`) and exit")
    return p.parse_args(argv)


def list_families() -> str:
    """One paragraph per registered family: name, summary, config sections, data needs, notes."""
    from vqd_scale.families import FAMILIES
    out = []
    for fam in FAMILIES.values():
        lines = [f"{fam.name}: {fam.summary}", f"  config sections: {', '.join(fam.sections) or '-'}",
                 f"  needs: CLIP embeddings {'yes' if fam.needs.embeddings else 'no'}, captions {fam.needs.captions}"]
        lines += [f"  {k}: {v}" for k, v in fam.notes.items()]
        out.append("\n".join(lines))
    return "\n\n".join(out)


def main(argv=None) -> int:
    if argv is None:  # run as a program (not called from Python, e.g. a test): handlers live until exit
        # First, before the torch/DeepSpeed imports that take seconds: a preemption signal then is
        # honoured at the first step instead of killing the rank, and one while the process exits after
        # its last checkpoint cannot turn a finished run into a failure.
        signals.install_early()
    os.environ.setdefault("DS_ACCELERATOR", "cpu" if not _has_cuda() else "cuda")
    args = parse_args(argv)
    if args.families:
        print(list_families())
        return 0
    config = args.config
    overrides = list(args.overrides)
    if config is not None and "=" in config:  # `vqd-train key=value ...` without a file
        overrides.insert(0, config)
        config = None
    from vqd_scale.families import load_config
    try:
        cfg = load_config(config or DEFAULT_CONFIG, overrides)
        from vqd_scale.train.loop import run
        code = run(cfg, resume=args.resume, init_from=args.init_from)
    except UserError as e:  # a bug keeps its traceback
        print(f"vqd-train: error: {e}", file=sys.stderr)
        return 2
    return code


def _has_cuda() -> bool:
    import torch
    return torch.cuda.is_available()


if __name__ == "__main__":
    sys.exit(main())
