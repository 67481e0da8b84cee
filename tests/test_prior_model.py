"""Prior transformer and mixture: registry, masking, CFG null context, component choice, learnable mixture."""
import pytest
import torch

from vqd_scale.config import PriorConfig
from vqd_scale.models.prior import PRIOR_SIZES, Block, Mixture, PriorModel, resolve_prior_size

E, DC, L = 8, 16, 6


def _cfg(**kw):
    return PriorConfig(size="debug", embed_dim=E, context_dim=DC, context_len=L, num_components=3, **kw)


def _inputs(B=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, E, generator=g), torch.randint(0, 1000, (B,), generator=g), torch.randn(B, E, generator=g),
            torch.randint(0, 3, (B,), generator=g), torch.randn(B, L, DC, generator=g))


def test_size_registry_and_overrides():
    assert resolve_prior_size(PriorConfig(size="corgi-16")) == PRIOR_SIZES["corgi-16"]
    assert (PRIOR_SIZES["corgi-8"].dim, PRIOR_SIZES["corgi-8"].heads, PRIOR_SIZES["corgi-20"].layers) == (2048, 32, 20)
    assert resolve_prior_size(PriorConfig(size="corgi-8", layers=3)).layers == 3
    with pytest.raises(ValueError, match="prior.size"):
        resolve_prior_size(PriorConfig(size="huge"))
    with pytest.raises(ValueError, match="divisible"):
        resolve_prior_size(PriorConfig(dim=30, heads=4))


def test_block_attention_is_causal():
    torch.manual_seed(0)
    blk = Block(16, 4)
    x = torch.randn(2, 7, 16)
    y = blk(x)
    x2 = x.clone()
    x2[:, 4:] += torch.randn(2, 3, 16)  # change only the later positions
    y2 = blk(x2)
    torch.testing.assert_close(y[:, :4], y2[:, :4])
    assert (y[:, 4:] - y2[:, 4:]).abs().max() > 1e-3


def test_forward_uses_every_input_and_dropped_text_is_zero_context():
    torch.manual_seed(0)
    m = PriorModel(_cfg()).eval()
    z, t, te, c, ctx = _inputs()
    out = m(z, t, te, c, ctx)
    assert out.shape == (4, E)
    for i, changed in enumerate([z + 1, (t + 100) % 1000, te + 1, (c + 1) % 3, ctx + 1]):
        args = list(_inputs())
        args[i] = changed
        assert (m(*args) - out).abs().max() > 1e-4, f"input {i} has no effect"
    drop = torch.tensor([True, False, True, False])
    dropped = m(z, t, te, c, ctx, drop_text=drop)
    torch.testing.assert_close(dropped[~drop], out[~drop])
    torch.testing.assert_close(dropped[drop], m(z, t, te, c, torch.zeros_like(ctx))[drop])
    torch.testing.assert_close(m(z, t, te, c, None), m(z, t, te, c, torch.zeros_like(ctx)))
    with pytest.raises(ValueError, match="context_len"):
        m(z, t, te, c, torch.randn(4, L + 1, DC))


def test_activation_checkpointing_same_output_and_grads():
    torch.manual_seed(0)
    a = PriorModel(_cfg())
    b = PriorModel(_cfg(activation_checkpointing=True))
    b.load_state_dict(a.state_dict())
    z, t, te, c, ctx = _inputs()
    la, lb = a(z, t, te, c, ctx).square().sum(), b(z, t, te, c, ctx).square().sum()
    la.backward(), lb.backward()
    torch.testing.assert_close(la, lb)
    torch.testing.assert_close(a.blocks[0].qkv.weight.grad, b.blocks[0].qkv.weight.grad)


def test_mixture_choice_by_cosine_and_bad_clusters():
    mix = Mixture(3, 4)
    means = torch.tensor([[1.0, 0, 0, 0], [0, 5.0, 0, 0], [0, 0, 0.1, 0]])
    mix.load_clusters(means, torch.full((3, 4), 0.2))
    text = torch.tensor([[0.0, 0.1, 3.0, 0], [2.0, 0.5, 0, 0], [0, 1.0, 0.9, 0]])
    c, mu, sd, aux = mix(text)
    assert c.tolist() == [2, 0, 1]  # cosine, not dot product (means differ in norm)
    torch.testing.assert_close(mu, means[c])
    torch.testing.assert_close(sd, torch.full((3, 4), 0.2))
    assert aux == {}
    with pytest.raises(ValueError, match="std"):
        mix.load_clusters(means, torch.zeros(3, 4))
    with pytest.raises(ValueError, match="num_components"):
        mix.load_clusters(means[:2], torch.ones(2, 4))


def test_learnable_mixture_lr_scale_and_losses():
    mix = Mixture(2, 4, learnable=True, lr_scale=0.01)
    mix.load_clusters(torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0]]), torch.full((2, 4), 0.1))
    before = mix.means().detach().clone()
    opt = torch.optim.AdamW(mix.parameters(), lr=0.1, weight_decay=0.0)
    z0 = torch.tensor([[1.0, 1.0, 0, 0], [0.2, 1.0, 0, 0.5]])
    c, _, _, aux = mix(torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0]]), z0=z0, kappa=5.0,
                       aux_noise=torch.randn(16, 2, 4, generator=torch.Generator().manual_seed(0)))
    assert c.tolist() == [0, 1] and set(aux) == {"mixture_pull", "mixture_push"}
    assert aux["mixture_push"].item() == pytest.approx(0.0, abs=1e-6)  # orthogonal chosen means
    (aux["mixture_pull"] + aux["mixture_push"]).backward()
    assert mix.mean_offset.grad.abs().sum() > 0 and mix.log_std_offset.grad.abs().sum() > 0
    opt.step()
    step = (mix.means().detach() - before).abs().max().item()
    assert 0.5 * 0.1 * 0.01 < step <= 1.01 * 0.1 * 0.01  # Adam's first step is ±lr on the offset, × lr_scale
    # pull: moving μ_0 toward z_0 increases cosine → the pull loss went down
    _, _, _, aux2 = mix(torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0]]), z0=z0, kappa=5.0,
                        aux_noise=torch.randn(16, 2, 4, generator=torch.Generator().manual_seed(0)))
    assert aux2["mixture_pull"] < aux["mixture_pull"]
    # push: two chosen components that point the same way are penalised; (1/B) Σ_{j≠i} as released
    same = Mixture(2, 4, learnable=True)
    same.load_clusters(torch.tensor([[1.0, 0, 0, 0], [1.0, 0.1, 0, 0]]), torch.ones(2, 4))
    _, _, _, aux3 = same(torch.tensor([[1.0, -1, 0, 0], [0, 1.0, 0, 0]]), z0=z0, aux_noise=torch.randn(2, 2, 4))
    assert aux3["mixture_push"].item() == pytest.approx(0.5 * 1 / 1.01 ** 0.5, abs=1e-5)


def test_learnable_mixture_losses_use_the_per_sample_weight_as_released():
    """Released `training_losses`: pull = −mean_i w_i·mean_d cos(z0_i, μ + κσε_d), push = mean_i w_i·(1/B)Σ_{j≠i} cos."""
    g = torch.Generator().manual_seed(0)
    mix = Mixture(3, 4, learnable=True)
    mix.load_clusters(torch.randn(3, 4, generator=g), 0.1 + torch.rand(3, 4, generator=g))
    text, z0, noise = torch.randn(5, 4, generator=g), torch.randn(5, 4, generator=g), torch.randn(16, 5, 4, generator=g)
    w = torch.tensor([1.0, 0.5, 0.0, 0.25, 2.0])
    c, mu, sd, aux = mix(text, z0=z0, kappa=5.0, aux_noise=noise, weight=w)
    cos = torch.nn.functional.cosine_similarity
    pull = -sum(w[i] * cos(mu[i] + 5.0 * sd[i] * noise[:, i], z0[i].expand(16, 4), dim=-1).mean() for i in range(5)) / 5
    push = sum(w[i] * sum(cos(mu[i], mu[j], dim=0) for j in range(5) if j != i) / 5 for i in range(5)) / 5
    torch.testing.assert_close(aux["mixture_pull"], pull)
    torch.testing.assert_close(aux["mixture_push"], push)
    _, _, _, unweighted = mix(text, z0=z0, kappa=5.0, aux_noise=noise)  # no weight = 1 per sample
    _, _, _, ones = mix(text, z0=z0, kappa=5.0, aux_noise=noise, weight=torch.ones(5))
    torch.testing.assert_close(unweighted, ones)
