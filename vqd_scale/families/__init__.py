"""The model-family registry: every family a run can train, and the RunConfig their sections make.

Adding a family = one package under `families/` exporting a `Family` (families/base.py) + one line in
FAMILIES below. The training loop, the eval job and the CLIs dispatch only through `get(cfg.task)`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from vqd_scale import config as C
from vqd_scale.errors import ConfigError
from vqd_scale.families import decoder, prior, vqd
from vqd_scale.families.base import Family

FAMILIES: dict[str, Family] = {f.name: f for f in (
    vqd.FAMILY,
    prior.FAMILY,
    decoder.FAMILY,
)}


def _sections() -> dict[str, type]:
    """Every family's config sections; a section shared by two families must be the same dataclass."""
    out: dict[str, type] = {}
    for fam in FAMILIES.values():
        for name, typ in fam.sections.items():
            if out.setdefault(name, typ) is not typ:
                raise TypeError(f"config section {name!r} is {out[name].__name__} in one family and "
                                f"{typ.__name__} in {fam.name!r}")
    return out


# Every run's config holds every family's sections (defaulted), so any family's config.yaml loads here.
RunConfig = C.run_config_class(_sections())


def get(name: str) -> Family:
    """The family named `name` (a RunConfig's `task`); an unknown name is refused, listing the known ones."""
    if name not in FAMILIES:
        raise ConfigError(f"config key 'task': got {name!r}; the model families are {', '.join(FAMILIES)}")
    return FAMILIES[name]


def validate(cfg) -> "RunConfig":
    """Value checks: the common sections, every family's sections, and the chosen family's cross-checks."""
    fam = get(cfg.task)
    C.validate_common(cfg)
    for other in FAMILIES.values():
        other.validate(cfg, other is fam)
    return cfg


def load_config(path: Optional[str | Path] = None, overrides: Optional[list[str]] = None) -> "RunConfig":
    """YAML file (optional) + dotted overrides (`optim.lr=1e-4`) → validated RunConfig."""
    return validate(C.parse_config(RunConfig, path, overrides))


def build_task(cfg, device):
    """The training task of `cfg.task`'s family (module + loss), on `device`."""
    return get(cfg.task).build_task(cfg, device)


def sampler_from(cfg, weights: dict, device, run_dir: str | Path):
    """The `Sampler` of cfg's family over `weights` (text tower from `run_dir`); a family without one is refused."""
    from vqd_scale.rundir import load_text_tower

    fam = get(cfg.task)
    if fam.sampler is None:
        raise ConfigError(f"task={cfg.task!r} ({fam.summary}) has no sampler; vqd-sample cannot generate with it")
    return fam.sampler(cfg, weights, device, lambda: load_text_tower(cfg.text, run_dir, device))


def load_sampler(path: str | Path, device="cpu", which: str = "ema"):
    """(cfg, Sampler) of a run directory (its newest complete checkpoint) or of one complete checkpoint."""
    from vqd_scale.errors import MissingInput
    from vqd_scale.rundir import COMPLETE, CONFIG_FILE, list_complete, load_weights

    p = Path(path)
    if (p / COMPLETE).is_file():
        ckpt, run_dir = p, p.resolve().parents[1]
    else:
        done = list_complete(p)
        if not done:
            raise MissingInput(f"{path} is neither a run directory with a complete checkpoint nor a complete "
                               "checkpoint directory")
        ckpt, run_dir = done[-1][1], p
    if not (run_dir / CONFIG_FILE).is_file():
        raise MissingInput(f"{run_dir / CONFIG_FILE} not found: {path} is not inside a run directory")
    cfg = load_config(run_dir / CONFIG_FILE)
    return cfg, sampler_from(cfg, load_weights(ckpt, which), device, run_dir)
