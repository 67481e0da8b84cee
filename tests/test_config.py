"""Config parsing, overrides and validation messages."""
import pytest

from vqd_scale.config import ConfigError
from vqd_scale.families import load_config


def test_override_applies():
    cfg = load_config(overrides=["optim.lr=1e-3", "deepspeed.zero_stage=3"])
    assert cfg.optim.lr == 1e-3 and cfg.deepspeed.zero_stage == 3


@pytest.mark.parametrize("override,key", [
    ("optim.lr=-1", "optim.lr"),
    ("deepspeed.zero_stage=5", "deepspeed.zero_stage"),
    ("diffusion.preset=nope", "diffusion.preset"),
    ("optim.lrr=1", "optim.lrr"),
    ("data.batch_size=abc", "data.batch_size"),
])
def test_bad_value_is_refused_naming_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(overrides=[override])
