"""diffusers interop: mapped weights give diffusers' log-probs; the mapping round-trips; refusals."""
import pytest
import torch

from vqd_scale.compat import import_open_clip
from vqd_scale.config import TransformerConfig
from vqd_scale.interop.diffusers import NULL_KEY, from_diffusers, split_null, to_diffusers
from tests.test_transformer import make, tiny_cfg

import_open_clip()  # torchvision patch needed before diffusers imports transformers on CPU torch
from diffusers import Transformer2DModel  # noqa: E402


def test_same_log_probs_as_diffusers():
    m = make()
    conf, dsd = to_diffusers(m.state_dict(), m.cfg)
    ref = Transformer2DModel(**conf).eval()
    tsd, null = split_null(dsd)
    ref.load_state_dict(tsd, strict=True)  # every key mapped, none left over
    x = torch.randint(0, 31, (3, 16))
    x[1, ::2] = 30
    ctx = torch.randn(3, 7, 24)
    with torch.no_grad():
        for t in (0, 4, 9):  # diffusers wants one 0-dim timestep for the whole batch
            ours = m(x, torch.full((3,), t), ctx)
            theirs = ref(x, encoder_hidden_states=ctx, timestep=torch.tensor(t)).sample
            assert (ours - theirs).abs().max() <= 1e-4
    assert torch.equal(null, m.null_context)


def test_round_trip_is_identity():
    m = make()
    sd = m.state_dict()
    conf, dsd = to_diffusers(sd, m.cfg)
    cfg2, sd2 = from_diffusers(conf, dsd)
    assert set(sd2) == set(sd) and all(torch.equal(sd2[k], v) for k, v in sd.items())
    assert VQDiffusionTransformerFrom(cfg2).load_state_dict(sd2, strict=True) is not None
    assert (cfg2.num_classes, cfg2.layers, cfg2.dim, cfg2.heads) == (30, 2, 32, 2)


def VQDiffusionTransformerFrom(cfg):
    from vqd_scale.models.transformer import VQDiffusionTransformer
    return VQDiffusionTransformer(cfg)


def test_refusals_name_the_fix():
    with pytest.raises(ValueError, match="square"):
        to_diffusers({}, tiny_cfg(height=4, width=8))
    with pytest.raises(ValueError, match="mlp_ratio"):
        to_diffusers({}, TransformerConfig(size="S", num_classes=10))
    m = make()
    conf, dsd = to_diffusers(m.state_dict(), m.cfg)
    del dsd[NULL_KEY]
    with pytest.raises(ValueError, match="null"):
        from_diffusers(conf, dsd)
    with pytest.raises(ValueError, match="activation_fn"):
        from_diffusers({**conf, "activation_fn": "geglu"}, dsd, null_embedding=m.null_context)
