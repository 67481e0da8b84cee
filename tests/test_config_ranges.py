"""Every numeric config field is range-checked before launch: -1 is refused everywhere, 0 wherever it
cannot mean something (a zero interval divided by, or looped on, only after the process group started)."""
import dataclasses
import typing

import pytest

from vqd_scale.config import ConfigError

# Fields where 0 is a documented value (off / none / from the manifest / the first seed / ZeRO stage 0).
from vqd_scale.families import RunConfig, load_config
ZERO_OK = {
    "seed", "data.seed", "eval.seed", "model.num_classes", "model.dropout", "diffusion.aux_weight",
    "diffusion.gamma_cum_start", "diffusion.importance_min_count", "diffusion.importance_ema", "diffusion.caption_dropout", "data.num_workers",
    "data.shuffle_buffer", "optim.weight_decay", "optim.grad_clip", "optim.warmup_samples", "optim.min_lr_ratio",
    "optim.ema_decay", "deepspeed.zero_stage", "checkpoint.milestone_every", "eval.idle_timeout",
    "eval.sampler.guidance_scale", "eval.sampler.purity_temperature", "shifted.text_dropout",
    "shifted.guidance_scale", "decoder.drop_image", "decoder.drop_text", "decoder.perturb_alpha",
}


def numeric_fields(cls=RunConfig, prefix=""):
    """Dotted names of every int / float (or Optional of one) field, recursively."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        t = hints[f.name]
        args = [a for a in typing.get_args(t) if a is not type(None)]
        base = args[0] if typing.get_origin(t) is typing.Union and len(args) == 1 else t
        if dataclasses.is_dataclass(base):
            yield from numeric_fields(base, f"{prefix}{f.name}.")
        elif base in (int, float):
            yield f"{prefix}{f.name}"


FIELDS = sorted(numeric_fields())


def test_the_sweep_sees_the_fields():
    assert {"logging.every_steps", "checkpoint.every_minutes", "data.epoch_samples", "optim.ema_every",
            "eval.sampler.steps", "model.layers"} <= set(FIELDS) and len(FIELDS) > 60
    assert ZERO_OK <= set(FIELDS)


@pytest.mark.parametrize("key", FIELDS)
def test_negative_is_refused_and_zero_only_where_it_means_something(key):
    name = key.rsplit(".", 1)[-1]  # the message names the field (some checks name a pair: "height and width")
    with pytest.raises(ConfigError, match=name):
        load_config(overrides=[f"{key}=-1"])
    if key in ZERO_OK:
        load_config(overrides=[f"{key}=0"])
    else:
        with pytest.raises(ConfigError, match=name):
            load_config(overrides=[f"{key}=0"])
