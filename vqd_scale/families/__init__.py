"""The model-family registry: every family a run can train, and the RunConfig their sections make.

Adding a family = one package under `families/` exporting a `Family` (families/base.py) + one line in
FAMILIES below. The training loop, the eval job and the CLIs dispatch only through `get(cfg.task)`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from vqd_scale import config as C
from vqd_scale.errors import ConfigError
from vqd_scale.families import prior, vqd
from vqd_scale.families.base import Family

FAMILIES: dict[str, Family] = {f.name: f for f in (
    vqd.FAMILY,
    prior.FAMILY,
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
