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


def _official_keys(sd):
    """Write our weights under the official Text2ImageTransformer names (independent of official.py)."""
    p = "transformer.transformer."
    o = {p + "content_emb.emb.weight": sd["token_emb.weight"], p + "content_emb.height_emb.weight": sd["row_emb.weight"],
         p + "content_emb.width_emb.weight": sd["col_emb.weight"], p + "to_logits.0.weight": sd["norm_out.weight"],
         p + "to_logits.0.bias": sd["norm_out.bias"], p + "to_logits.1.weight": sd["out.weight"],
         p + "to_logits.1.bias": sd["out.bias"], "transformer.empty_text_embed": sd["null_context"].double(),
         "transformer.condition_emb.some_clip_weight": torch.zeros(3)}
    for i in range(2):
        b, q = f"blocks.{i}.", f"{p}blocks.{i}."
        for ours, theirs in (("norm1", "ln1"), ("norm2", "ln1_1")):
            for s in ("emb.weight", "linear.weight", "linear.bias"):
                o[f"{q}{theirs}.{s}"] = sd[f"{b}{ours}.{s}"]
        for s in ("weight", "bias"):
            qq, kk, vv = sd[f"{b}qkv.{s}"].chunk(3)
            o.update({f"{q}attn1.query.{s}": qq, f"{q}attn1.key.{s}": kk, f"{q}attn1.value.{s}": vv})
            k2, v2 = sd[f"{b}kv2.{s}"].chunk(2)
            o.update({f"{q}attn2.key.{s}": k2, f"{q}attn2.value.{s}": v2, f"{q}attn2.query.{s}": sd[f"{b}q2.{s}"]})
            for ours, theirs in (("proj1", "attn1.proj"), ("proj2", "attn2.proj"), ("norm3", "ln2"),
                                 ("fc1", "mlp.0"), ("fc2", "mlp.2")):
                o[f"{q}{theirs}.{s}"] = sd[f"{b}{ours}.{s}"]
    return o


def test_official_checkpoint_import(tmp_path):
    from vqd_scale.interop.official import load_official
    from vqd_scale.models.transformer import VQDiffusionTransformer
    raw, ema = make(seed=0), make(seed=1)
    ema_official = {k[len("transformer."):]: v for k, v in _official_keys(ema.state_dict()).items()
                    if k.startswith("transformer.transformer.")}
    path = tmp_path / "official.pth"
    torch.save({"model": _official_keys(raw.state_dict()), "ema": ema_official}, path)
    cfg, sd = load_official(path, heads=2)  # EMA by default, like the official inference
    m = VQDiffusionTransformer(cfg)
    m.load_state_dict(sd, strict=True)
    x, t, ctx = torch.randint(0, 31, (2, 16)), torch.tensor([2, 7]), torch.randn(2, 7, 24)
    with torch.no_grad():
        assert torch.allclose(m.eval()(x, t, ctx), ema(x, t, ctx), atol=1e-6)
    cfg_raw, sd_raw = load_official(path, use_ema=False, heads=2)
    assert torch.equal(sd_raw["out.weight"], raw.state_dict()["out.weight"])
    assert (cfg.num_classes, cfg.height, cfg.context_dim, cfg.num_timesteps, cfg.layers) == (30, 4, 24, 10, 2)


def test_outdated_diffusers_config_without_norm_type_imports():
    """Hub configs older than `norm_type` (ITHQ's) build an ada_norm model in diffusers; we must import them."""
    m = make()
    conf, dsd = to_diffusers(m.state_dict(), m.cfg)
    old = {k: v for k, v in conf.items() if k != "norm_type"}
    ref = Transformer2DModel(**old).eval()  # diffusers upgrades layer_norm + num_embeds_ada_norm to ada_norm
    tsd, null = split_null(dsd)
    ref.load_state_dict(tsd, strict=True)
    assert dict(ref.config)["norm_type"] == "layer_norm"  # what an import sees in the loaded config
    cfg2, sd2 = from_diffusers(dict(ref.config), {**ref.state_dict(), NULL_KEY: null})
    m2 = VQDiffusionTransformerFrom(cfg2).eval()
    m2.load_state_dict(sd2, strict=True)
    x, ctx = torch.randint(0, 31, (2, 16)), torch.randn(2, 7, 24)
    with torch.no_grad():
        theirs = ref(x, encoder_hidden_states=ctx, timestep=torch.tensor(3)).sample
        assert (m2(x, torch.full((2,), 3), ctx) - theirs).abs().max() <= 1e-4
    with pytest.raises(ValueError, match="norm_type"):  # a genuine layer_norm model still has no mapping
        from_diffusers({**old, "num_embeds_ada_norm": None}, {**dsd})


@pytest.mark.parametrize("key,value", [("norm_eps", 1e-6), ("double_self_attention", True),
                                       ("only_cross_attention", True), ("norm_elementwise_affine", False)])
def test_diffusers_config_that_changes_the_math_is_refused_by_name(key, value):
    """These build another network from the same key names: importing them would be silently wrong."""
    m = make()
    conf, dsd = to_diffusers(m.state_dict(), m.cfg)
    with pytest.raises(ValueError, match=key):
        from_diffusers({**conf, key: value}, dsd)


def test_null_embedding_of_another_width_is_refused_by_name():
    m = make()
    conf, dsd = to_diffusers(m.state_dict(), m.cfg)
    with pytest.raises(ValueError, match="null embedding"):
        from_diffusers(conf, {**dsd, NULL_KEY: torch.randn(7, conf["cross_attention_dim"] + 8)})


def test_official_import_refuses_inconsistent_codebook_and_null_by_name():
    from vqd_scale.interop.official import from_official
    sd = _official_keys(make(seed=0).state_dict())
    emb = "transformer.transformer.content_emb.emb.weight"
    with pytest.raises(ValueError, match="content_emb.emb"):
        from_official({**sd, emb: sd[emb][:-1]}, heads=2)  # a codebook pruned by another map
    with pytest.raises(ValueError, match="empty_text_embed"):
        from_official({**sd, "transformer.empty_text_embed": torch.randn(7, 16)}, heads=2)
