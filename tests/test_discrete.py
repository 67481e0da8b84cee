"""Mask-and-replace math against diffusers' scheduler, explicit transition matrices and Monte-Carlo."""
import math

import pytest
import torch
from diffusers import VQDiffusionScheduler

from vqd_scale.config import DiscreteDiffusionConfig
from vqd_scale.diffusion.discrete import LOG_EPS, ImportanceSampler, MaskAndReplace, log_onehot
from vqd_scale.diffusion.presets import SCHEDULE_PRESETS, resolve_endpoints

PRESETS = ["released", "paper"]


def make(preset, K, T=100, **kw):
    return MaskAndReplace(DiscreteDiffusionConfig(preset=preset, num_timesteps=T, **kw), K)


def random_inputs(g, B, K, N, sharp=3.0):
    log_p = torch.log_softmax(torch.randn(B, K, N, generator=g) * sharp, 1)
    x_t = torch.randint(0, K + 1, (B, N), generator=g)  # includes the mask id K
    return log_p, x_t


@pytest.mark.parametrize("preset", PRESETS)
def test_q_posterior_matches_diffusers(preset):
    K, T, B, N = 7, 100, 2, 40
    d = make(preset, K, T)
    a0, a1, g0, g1 = SCHEDULE_PRESETS[preset]
    sch = VQDiffusionScheduler(num_vec_classes=K + 1, num_train_timesteps=T, alpha_cum_start=a0,
                               alpha_cum_end=a1, gamma_cum_start=g0, gamma_cum_end=g1)
    g = torch.Generator().manual_seed(0)
    for t in range(T):
        log_p, x_t = random_inputs(g, B, K, N)
        ours = d.q_posterior(log_p, x_t, torch.full((B,), t))
        ref = sch.q_posterior(log_p, x_t, torch.tensor(t))
        assert ours.shape == ref.shape == (B, K + 1, N)
        assert (ours.exp() - ref.exp()).abs().max() <= 1e-5, f"prob mismatch at t={t}"
        # Log space where meaningful: diffusers writes log(1e-30)+… (not −inf) into the mask row of
        # an unmasked x_t, a probability that is exactly 0; skip that row and values near the floor.
        meaningful = ref > -60
        meaningful[:, K] &= x_t == K
        assert (ours - ref)[meaningful].abs().max() <= 1e-5, f"log mismatch at t={t}"


def explicit_matrices(K, T, a0, a1, g0, g1):
    """One-step Q_t [K+1,K+1] (row = from, col = to) built from the spec's definitions, float64."""
    frac = torch.arange(T, dtype=torch.float64) / (T - 1)
    acum = torch.cat([torch.ones(1, dtype=torch.float64), a0 + frac * (a1 - a0)])
    gcum = torch.cat([torch.zeros(1, dtype=torch.float64), g0 + frac * (g1 - g0)])
    Qs = []
    for t in range(1, T + 1):
        alpha = acum[t] / acum[t - 1]
        gamma = 1 - (1 - gcum[t]) / (1 - gcum[t - 1])
        beta = (1 - alpha - gamma) / K
        Q = torch.zeros(K + 1, K + 1, dtype=torch.float64)
        Q[:K, :K] = beta
        Q[:K, :K] += torch.eye(K, dtype=torch.float64) * alpha
        Q[:K, K] = gamma
        Q[K, K] = 1.0
        Qs.append(Q)
    return Qs


def product(Qs, s, t):
    """Q_{s→t} = Q_{s+1} ⋯ Q_t (0-based code steps; s = −1 means from x0)."""
    M = torch.eye(Qs[0].shape[0], dtype=torch.float64)
    for k in range(s + 1, t + 1):
        M = M @ Qs[k]
    return M


@pytest.mark.parametrize("preset", PRESETS)
def test_q_posterior_matches_bruteforce_including_skip_steps(preset):
    K, T, N = 5, 20, 6
    d = make(preset, K, T)
    Qs = explicit_matrices(K, T, *SCHEDULE_PRESETS[preset])
    # the closed-form cumulative rows must equal the matrix products
    for t in (0, 7, T - 1):
        bar = product(Qs, -1, t)
        assert torch.allclose(bar[0, 0], d.alpha_cum[t + 1] + d.beta_cum[t + 1])
        assert torch.allclose(bar[0, 1], d.beta_cum[t + 1])
        assert torch.allclose(bar[0, K], d.gamma_cum[t + 1])
    g = torch.Generator().manual_seed(1)
    pairs = [(t, t - 1) for t in range(T)] + [(T - 1, 10), (12, 3), (5, -1), (T - 1, -1), (1, -1)]
    for t, s in pairs:
        log_p, x_t = random_inputs(g, 1, K, N, sharp=1.5)
        ours = d.q_posterior(log_p, x_t, torch.tensor([t]), torch.tensor([s])).exp()[0].double()
        Qst, Qbar_s, Qbar_t = product(Qs, s, t), product(Qs, -1, s), product(Qs, -1, t)
        p = log_p[0].double().exp()  # [K, N]
        for n in range(N):
            i = int(x_t[0, n])
            # Σ_{x̃0} q(x_t=i | x_s=j) q(x_s=j | x̃0) p̃(x̃0) / q(x_t=i | x̃0), for every j
            ref = torch.zeros(K + 1, dtype=torch.float64)
            for x0 in range(K):
                ref += Qst[:, i] * Qbar_s[x0, :] * p[x0, n] / Qbar_t[x0, i]
            assert torch.allclose(ours[:, n], ref, atol=1e-5), f"t={t} t_prev={s} x_t={i}"


@pytest.mark.parametrize("preset", PRESETS)
def test_p_sample_draws_from_q_posterior(preset):
    """The two-stage draw (x̃0 ~ p̃, then x_s ~ q(x_s|x_t,x̃0)) has the q_posterior distribution."""
    K, T, M = 4, 20, 40000
    d = make(preset, K, T)
    g = torch.Generator().manual_seed(6)
    p0 = torch.tensor([0.5, 0.3, 0.15, 0.05])
    log_x0 = p0.log().view(1, K, 1).expand(1, K, M)
    for (t, s) in [(10, 9), (19, 4), (3, -1), (0, -1)]:
        for xt_val in (K, 1, 3):  # masked, and two codes with different p̃
            x_t = torch.full((1, M), xt_val)
            tt, ss = torch.tensor([t]), torch.tensor([s])
            want = d.q_posterior(log_x0[:, :, :1], x_t[:, :1], tt, ss).exp().view(-1).double()
            want = want / want.sum()
            got = torch.bincount(d.p_sample(log_x0, x_t, tt, ss, g).view(-1), minlength=K + 1).double() / M
            std = (want * (1 - want) / M).sqrt()
            assert ((got - want).abs() <= 5 * std + 1e-4).all(), (t, s, xt_val, got, want)


def test_q_posterior_rejects_bad_input():
    d = make("paper", 5, 10)
    log_p = torch.zeros(1, 4, 3)
    with pytest.raises(ValueError, match="K=5"):
        d.q_posterior(log_p, torch.zeros(1, 3, dtype=torch.long), torch.tensor([3]))
    with pytest.raises(ValueError, match="t_prev"):
        d.q_posterior(torch.zeros(1, 5, 3), torch.zeros(1, 3, dtype=torch.long), torch.tensor([3]),
                      torch.tensor([3]))


@pytest.mark.parametrize("t", [0, 40, 99])
def test_q_sample_marginals(t):
    K, B, N = 4, 50, 4000
    d = make("paper", K, 100)
    x0 = torch.randint(0, K, (B, N), generator=torch.Generator().manual_seed(2))
    xt = d.q_sample(x0, torch.full((B,), t), torch.Generator().manual_seed(3))
    n = B * N
    a, b, g = (float(v[t + 1]) for v in (d.alpha_cum, d.beta_cum, d.gamma_cum))
    other = (x0 + 1) % K  # one particular other code
    for name, hits, p in [("stay", xt == x0, a + b), ("other", xt == other, b), ("mask", xt == K, g)]:
        std = math.sqrt(p * (1 - p) / n)
        assert abs(hits.float().mean().item() - p) <= 5 * std + 1e-7, f"{name} at t={t}"


def test_q_sample_rejects_mask_in_x0():
    d = make("released", 4, 10)
    with pytest.raises(ValueError, match="token ids"):
        d.q_sample(torch.full((1, 3), 4), torch.tensor([2]))


@pytest.mark.parametrize("preset", PRESETS)
def test_losses(preset):
    K, T, B, N = 6, 100, 8, 30
    d = make(preset, K, T, aux_weight=0.01)
    g = torch.Generator().manual_seed(4)
    x0 = torch.randint(0, K, (B, N), generator=g)
    t = torch.tensor([0, 1, 2, 10, 50, 80, 98, 99])
    x_t = d.q_sample(x0, t, g)
    perfect = d.losses(log_onehot(x0, K), x0, x_t, t)
    assert perfect["vlb"].abs().max() < 1e-4  # KL and NLL vanish when p̃ is the true x0
    logits = torch.randn(B, K, N, generator=g, requires_grad=True)
    out = d.losses(torch.log_softmax(logits, 1), x0, x_t, t)
    assert (out["vlb"] >= -1e-6).all()
    assert (out["vlb"][1:] > 1e-3).any()  # a random prediction does cost something
    w = 0.01 * (2 - t.float() / T)
    assert torch.allclose(out["loss"], out["vlb"] + w * out["aux"])
    ce = torch.nn.functional.cross_entropy(logits, x0, reduction="none").mean(1)
    assert torch.allclose(out["aux"], ce, atol=1e-5)
    assert torch.allclose(out["vlb"][0], ce[0], atol=1e-4)  # t = 0: −log p(x0|x1) with x_{−1} = x0
    out["loss"].mean().backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


@pytest.mark.parametrize("preset", PRESETS)
def test_t0_decoder_nll_is_minus_log_p_x0_for_confidently_wrong_kept_tokens(preset):
    """t = 0 → posterior toward x0 is p̃ itself: NLL = −log p̃(x0) up to the −70 clamp (was capped near 49)."""
    K, N = 1024, 4
    d = make(preset, K)
    x0 = torch.tensor([[3, 5, 7, 9]])
    x_t = torch.tensor([[3, 6, 7, K]])  # kept right, kept wrong, kept right, masked
    for want in (10.0, 30.0, 60.0):
        logits = torch.zeros(1, K, N)
        logits[0, 11, :] = want + math.log(K)  # all mass on code 11: p̃(x0) ≈ e^-want at every position
        log_p = torch.log_softmax(logits, 1)
        out = d.losses(log_p, x0, x_t, torch.tensor([0]))
        expect = -log_p.gather(1, x0.unsqueeze(1)).mean()
        assert torch.allclose(out["vlb"], expect, rtol=1e-4), (want, out["vlb"], expect)
        post = d.q_posterior(log_p, x_t, torch.tensor([0]), torch.tensor([-1]))
        assert torch.allclose(post[:, :K], log_p.clamp(min=LOG_EPS), atol=1e-5)


def test_presets_and_overrides():
    assert resolve_endpoints("paper") == SCHEDULE_PRESETS["paper"]
    assert resolve_endpoints("paper", gamma_cum_end=0.8)[3] == 0.8
    with pytest.raises(ValueError, match="gamma_cum_end"):
        resolve_endpoints("custom", 0.99, 0.01, 0.0)
    with pytest.raises(ValueError, match="alpha_cum"):
        resolve_endpoints("paper", alpha_cum_end=0.5, gamma_cum_end=0.9)  # ᾱ+γ̄ > 1
    d = make("paper", 10)
    assert (d.beta >= 0).all() and (d.alpha <= 1).all()
    assert abs(float(d.gamma_cum[-1]) - 0.9) < 1e-12  # the paper's final mask rate
    assert abs(10 * float(d.beta_cum[-1]) - (1 - 0.9 - 0.000009)) < 1e-9


def test_importance_sampler():
    T = 10
    cfg = DiscreteDiffusionConfig(num_timesteps=T, importance_min_count=3, importance_ema=0.5)
    s, twin = ImportanceSampler(T, cfg), ImportanceSampler(T, cfg)
    g = torch.Generator().manual_seed(5)
    t, w = s.sample(64, generator=g)
    assert not s.ready() and torch.equal(w, torch.full((64,), float(T))) and t.min() >= 0 and t.max() < T
    loss_of = torch.linspace(0.1, 5.0, T)  # higher loss at higher t
    for _ in range(6):
        t, _ = s.sample(40, generator=g)
        gathered = (t, loss_of[t] * (1 + 0.05 * torch.randn(40, generator=g)))
        s.update(*gathered)
        twin.update(*gathered)
        assert torch.equal(s.ema_sq, twin.ema_sq) and torch.equal(s.count, twin.count)
    assert s.ready()
    p = s.probs()
    assert abs(float(p.sum()) - 1) < 1e-9
    expect = loss_of.double().clone()
    expect[0] = expect[1]  # t = 0 borrows L_1's weight (official)
    expect = 0.99 * expect / expect.sum() + 0.01 / T  # sqrt(EMA L²) ≈ L, plus the uniform floor
    assert torch.allclose(p, expect, rtol=0.1), (p, expect)
    t, w = s.sample(20000, generator=g)
    assert torch.allclose(w, (1 / p)[t].float())
    assert (t == 9).sum() > 3 * (t == 2).sum()
    # E[L_t / p_t] = Σ_t L_t: the weighted loss estimates the whole VLB (the official code's scale)
    est = float((loss_of[t] * w).mean())
    assert abs(est - float(loss_of.sum())) < 0.03 * float(loss_of.sum()), (est, float(loss_of.sum()))
    restored = ImportanceSampler(T, cfg)
    restored.load_state_dict(s.state_dict())
    assert torch.equal(restored.probs(), p)
    with pytest.raises(ValueError, match="num_timesteps"):
        ImportanceSampler(T + 1, cfg).load_state_dict(s.state_dict())


def test_log_onehot_floor():
    x = torch.tensor([[2, 0]])
    lo = log_onehot(x, 3)
    assert lo[0, 2, 0] == 0 and lo[0, 0, 0] == LOG_EPS and lo.shape == (1, 3, 2)
