"""Config parsing, overrides and validation messages."""
from pathlib import Path

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


CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads_and_validates(path):
    cfg = load_config(path)
    assert cfg.run_dir and cfg.max_samples > 0


def test_the_corgi_recipe_pairs_prior_and_decoder_on_one_clip():
    """configs/cc15m_prior.yaml feeds configs/laion_decoder.yaml's chain: the same CLIP embedding space."""
    root = CONFIGS[0].parent
    prior, dec = load_config(root / "cc15m_prior.yaml"), load_config(root / "laion_decoder.yaml")
    assert (prior.task, dec.task) == ("prior", "decoder")
    assert prior.prior.embed_dim == dec.decoder.embed_dim == 768 and prior.text.model == dec.text.model == "ViT-L-14"
    assert dec.eval.prior_run == prior.run_dir
    vqd = load_config(root / "laion_vqd_b.yaml")  # the text-conditioned baseline it is compared with
    assert (dec.model.size, dec.max_samples, dec.data.batch_size) == (vqd.model.size, vqd.max_samples,
                                                                      vqd.data.batch_size)
