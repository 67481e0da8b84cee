"""generate(): cached text K/V equals the uncached model, one batched forward per guided step, determinism."""
import pytest
import torch

from vqd_scale.config import DiscreteDiffusionConfig, SamplerConfig, TextEncoderConfig, TransformerConfig
from vqd_scale.diffusion.discrete import MaskAndReplace
from vqd_scale.generate import generate, make_denoise
from vqd_scale.models.text import FrozenCLIPTextEncoder
from vqd_scale.models.transformer import VQDiffusionTransformer

K, T = 12, 10


@pytest.fixture(scope="module")
def parts():
    torch.manual_seed(0)
    text = FrozenCLIPTextEncoder(TextEncoderConfig(model="tiny"))
    model = VQDiffusionTransformer(TransformerConfig(num_classes=K, height=4, width=4, context_dim=64,
                                                     num_timesteps=T, dim=32, heads=2)).eval()
    with torch.no_grad():
        model.out.weight.mul_(50)  # sharper predictions, so text and guidance visibly matter
    diffusion = MaskAndReplace(DiscreteDiffusionConfig(num_timesteps=T), K)
    return model, text, diffusion


def test_cached_kv_denoise_equals_uncached_model(parts):
    model, text, _ = parts
    ctx = text(text.tokenize(["a cat", "two dogs", "a red car"]))
    x = torch.randint(0, K + 1, (3, 16))
    t = torch.tensor([9, 9, 9])
    with torch.no_grad():
        log_c, log_u = make_denoise(model, ctx, guided=True)(x, t)
        assert torch.allclose(log_c, model(x, t, ctx), atol=1e-5)
        assert torch.allclose(log_u, model(x, t, None), atol=1e-5)
        only_c, none = make_denoise(model, ctx, guided=False)(x, t)
    assert none is None and torch.allclose(only_c, log_c, atol=1e-5)


def test_generate_tokens_deterministic_and_one_forward_per_step(parts):
    model, text, diffusion = parts
    tokens = text.tokenize(["a cat", "two dogs", "a red car"])
    batches = []
    hook = model.register_forward_hook(lambda m, args, out: batches.append(args[0].shape[0]))
    cfg = SamplerConfig(steps=5, guidance_scale=3.0, batch_size=2)
    a = generate(model, text, diffusion, tokens, cfg, torch.Generator().manual_seed(1))
    hook.remove()
    b = generate(model, text, diffusion, tokens, cfg, torch.Generator().manual_seed(1))
    assert a.shape == (3, 16) and a.min() >= 0 and a.max() < K  # fully unmasked, valid codes
    assert torch.equal(a, b)
    assert batches == [4] * 5 + [2] * 5  # chunks of 2 then 1, cond+uncond batched, 5 steps each
    c = generate(model, text, diffusion, tokens, SamplerConfig(steps=5, batch_size=8),
                 torch.Generator().manual_seed(1))
    assert not torch.equal(a, c)  # guidance changes the result


def test_generate_refuses_mismatched_parts(parts):
    model, text, _ = parts
    with pytest.raises(ValueError, match="K="):
        generate(model, text, MaskAndReplace(DiscreteDiffusionConfig(num_timesteps=T), K + 1),
                 text.tokenize(["x"]), SamplerConfig(steps=2))
