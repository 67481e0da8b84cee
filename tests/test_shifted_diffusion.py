"""Shifted Gaussian diffusion math: closed forms, the spec's posterior, and diffusers as an oracle."""
import pytest
import torch
from diffusers import DDPMScheduler

from vqd_scale.config import ShiftedDiffusionConfig
from vqd_scale.diffusion.shifted import ShiftedGaussianDiffusion, respace

E = 6


def _diff(**kw) -> ShiftedGaussianDiffusion:
    return ShiftedGaussianDiffusion(ShiftedDiffusionConfig(**kw))


def _mixture(B, g):
    mu = torch.randn(B, E, generator=g, dtype=torch.float64)
    sigma = 0.05 + torch.rand(B, E, generator=g, dtype=torch.float64) * 0.2
    return mu, sigma


def test_schedule_is_linear_beta_release():
    d = _diff()
    assert d.betas.shape == (1000,)
    assert d.betas[0].item() == pytest.approx(1e-4) and d.betas[-1].item() == pytest.approx(0.02)
    ref = DDPMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear")
    torch.testing.assert_close(d.alphas_cumprod.float(), ref.alphas_cumprod, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("t_int", [0, 37, 250])
def test_marginal_monte_carlo_matches_spec_and_one_step_chain(t_int):
    """q_sample's empirical moments = the spec's marginal = iterating the spec's one-step kernel."""
    g = torch.Generator().manual_seed(t_int)
    d = _diff()
    mu, sigma = _mixture(1, g)
    mu_s, s = d.frame(mu, sigma, mu)
    z0 = torch.randn(1, E, generator=g, dtype=torch.float64)
    N = 20000
    t = torch.full((N,), t_int)
    zt = d.q_sample(z0.expand(N, E), t, mu_s.expand(N, E), s.expand(N, E),
                    torch.randn(N, E, generator=g, dtype=torch.float64))
    abar = d.alphas_cumprod[t_int]
    spec_mean = abar.sqrt() * z0 + (1 - abar.sqrt()) * mu_s  # spec: √ᾱ z0 + (1 − √ᾱ) μ
    spec_var = (1 - abar) * s ** 2  # spec: (1 − ᾱ) Σ, Σ = (κσ)²
    m, v = d.marginal(z0, t[:1], mu_s, s)
    torch.testing.assert_close(m, spec_mean)
    torch.testing.assert_close(v, spec_var)
    tol = 5 * (spec_var / N).sqrt()  # 5 standard errors of the mean
    assert ((zt.mean(0) - spec_mean[0]).abs() < tol[0]).all()
    torch.testing.assert_close(zt.var(0), spec_var[0], rtol=0.05, atol=0.0)
    # the one-step kernel q(z_t | z_{t−1}) = N(√α z + (1 − √α) μ, β Σ) iterated t+1 times
    z = z0.expand(N, E).clone()
    for k in range(t_int + 1):
        a = 1 - d.betas[k]
        z = a.sqrt() * z + (1 - a.sqrt()) * mu_s + (d.betas[k] * s ** 2).sqrt() * torch.randn(
            N, E, generator=g, dtype=torch.float64)
    assert ((z.mean(0) - spec_mean[0]).abs() < tol[0]).all()
    torch.testing.assert_close(z.var(0), spec_var[0], rtol=0.05, atol=0.0)


def test_terminal_distribution_is_the_component():
    d = _diff()
    m, v = d.marginal(torch.full((1, E), 3.0, dtype=torch.float64), torch.tensor([999]),
                      torch.zeros(1, E, dtype=torch.float64), torch.full((1, E), 0.5, dtype=torch.float64))
    assert m.abs().max() < 0.02 and (v - 0.25).abs().max() < 1e-4


def test_posterior_matches_spec_closed_form_and_bayes():
    g = torch.Generator().manual_seed(1)
    d = _diff(kappa=5.0)
    B = 5
    mu, sigma = _mixture(B, g)
    mu_s, s = d.frame(mu, sigma, mu)
    torch.testing.assert_close(s, 5.0 * sigma)  # κ scales the std
    z0, zt = torch.randn(B, E, generator=g, dtype=torch.float64), torch.randn(B, E, generator=g, dtype=torch.float64)
    t = torch.tensor([1, 10, 300, 700, 999])
    mean, var = d.q_posterior(z0, zt, t, mu_s, s)
    beta, abar = d.betas[t], d.alphas_cumprod[t]
    abar_prev = d.alphas_cumprod[t - 1]
    c1 = (beta * abar_prev.sqrt() / (1 - abar))[:, None]
    c2 = ((1 - abar_prev) * (1 - beta).sqrt() / (1 - abar))[:, None]
    torch.testing.assert_close(mean, c1 * z0 + c2 * zt + (1 - c1 - c2) * mu_s)
    btilde = (beta * (1 - abar_prev) / (1 - abar))[:, None]
    torch.testing.assert_close(var, btilde * s ** 2)
    # Bayes: q(z_{t−1}|z_0) · q(z_t|z_{t−1}) as a product of Gaussians in z (precision-weighted)
    a = (1 - beta)[:, None]
    m_prior, v_prior = abar_prev.sqrt()[:, None] * z0 + (1 - abar_prev.sqrt())[:, None] * mu_s, (1 - abar_prev)[:, None] * s ** 2
    v_lik = beta[:, None] * s ** 2  # z_t = √α z_{t−1} + (1 − √α) μ + N(0, β Σ)
    prec = 1 / v_prior + a / v_lik
    m_bayes = (m_prior / v_prior + a.sqrt() * (zt - (1 - a.sqrt()) * mu_s) / v_lik) / prec
    torch.testing.assert_close(mean, m_bayes)
    torch.testing.assert_close(var, 1 / prec)


def test_posterior_at_t0_returns_z0():
    d = _diff()
    z0, zt = torch.randn(3, E), torch.randn(3, E)
    mean, var = d.q_posterior(z0, zt, torch.zeros(3, dtype=torch.long), torch.zeros(3, E), torch.ones(3, E))
    torch.testing.assert_close(mean, z0)
    assert var.abs().max() == 0


def test_unshifted_reduces_to_diffusers_ddpm():
    """μ = 0, Σ = I: add_noise and the x0-prediction posterior mean/variance equal diffusers'."""
    g = torch.Generator().manual_seed(2)
    d = _diff(shifted=False)
    ref = DDPMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
                        prediction_type="sample", clip_sample=False, variance_type="fixed_small")
    B = 8
    z0, noise = torch.randn(B, E, generator=g), torch.randn(B, E, generator=g)
    t = torch.randint(0, 1000, (B,), generator=g)
    mu, s = d.frame(torch.randn(B, E), torch.rand(B, E), z0)  # ignored when shifted=False
    assert mu.abs().max() == 0 and (s == 1).all()
    torch.testing.assert_close(d.q_sample(z0, t, mu, s, noise), ref.add_noise(z0, noise, t), rtol=1e-5, atol=1e-6)
    zt = torch.randn(B, E, generator=g)
    mean, var = d.q_posterior(z0, zt, t, mu, s)
    for i in range(B):
        ti = int(t[i])
        if ti == 0:
            continue
        # at t=0 diffusers adds no noise, so step() returns exactly the posterior mean
        ref_mean = ref.step(z0[i:i + 1], ti, zt[i:i + 1], generator=torch.Generator().manual_seed(0)).prev_sample
        ref_noise = torch.randn(1, E, generator=torch.Generator().manual_seed(0))
        torch.testing.assert_close(mean[i:i + 1], ref_mean - ref._get_variance(ti).sqrt() * ref_noise,
                                   rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(var[i], ref._get_variance(ti).expand(E), rtol=1e-4, atol=1e-9)


@pytest.mark.parametrize("variance,ref_type", [("small", "fixed_small"), ("large", "fixed_large")])
@pytest.mark.parametrize("steps", [8, 64])
def test_respaced_sampler_equals_diffusers_trajectory(variance, ref_type, steps):
    """Whole respaced ancestral trajectory, same generator, same deterministic denoiser."""
    d = _diff(shifted=False, sample_variance=variance)
    ref = DDPMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
                        prediction_type="sample", clip_sample=False, variance_type=ref_type)
    ts = respace(1000, steps)
    ref.set_timesteps(timesteps=ts)
    w = torch.randn(E, E, generator=torch.Generator().manual_seed(3)) / E ** 0.5

    def net(z, t):
        return torch.tanh(z @ w + t[:, None].float() / 1000)

    B = 4
    mu, s = torch.zeros(B, E), torch.ones(B, E)
    ours = d.sample(lambda z, t: (net(z, t), None), mu, s, steps, generator=torch.Generator().manual_seed(7))
    g = torch.Generator().manual_seed(7)
    z = torch.randn(B, E, generator=g)
    for t in ref.timesteps:
        z = ref.step(net(z, torch.full((B,), int(t))), int(t), z, generator=g).prev_sample
    torch.testing.assert_close(ours, z, rtol=1e-4, atol=1e-5)


def test_shifted_sampler_is_ddpm_in_y_space_and_guidance_clamp():
    """Shifted sampling = μ + s·(plain sampling of the y-space net); guidance mixes ẑ0; clamp bounds."""
    B = 3
    g = torch.Generator().manual_seed(4)
    mu, sigma = torch.randn(B, E, generator=g), 0.1 + torch.rand(B, E, generator=g)
    sh, plain = _diff(kappa=2.0), _diff(shifted=False)
    mu_s, s = sh.frame(mu, sigma, mu)

    def net_y(y, t):
        return torch.sin(y) * 0.5

    zs = sh.sample(lambda z, t: (mu_s + s * net_y((z - mu_s) / s, t), None), mu_s, s, 8,
                   generator=torch.Generator().manual_seed(5))
    ys = plain.sample(lambda y, t: (net_y(y, t), None), torch.zeros(B, E), torch.ones(B, E), 8,
                      generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(zs, mu_s + s * ys, rtol=1e-4, atol=1e-5)
    # guidance: ẑ_u + g (ẑ_c − ẑ_u); with 1 step the sample *is* ẑ0
    c, u = torch.full((B, E), 2.0), torch.full((B, E), 1.0)
    out = plain.sample(lambda z, t: (c, u), torch.zeros(B, E), torch.ones(B, E), 1, guidance_scale=3.0)
    torch.testing.assert_close(out, torch.full((B, E), 4.0))
    lo, hi = mu - 3 * sigma, mu + 3 * sigma
    out = sh.sample(lambda z, t: (torch.full_like(z, 100.0), None), mu_s, s, 8, x0_bounds=(lo, hi),
                    generator=torch.Generator().manual_seed(0))
    assert (out <= hi + 1e-5).all() and (out >= lo - 1e-5).all()


def test_loss_is_p2_weighted_mse_in_z_space():
    d = _diff()
    z0 = torch.randn(4, E)
    pred = z0 + 0.5
    t = torch.tensor([0, 10, 500, 999])
    torch.testing.assert_close(d.loss(pred, z0, t), 0.25 * (1 - d.alphas_cumprod[t]).float())
    assert _diff(p2_weighting=False).loss(pred, z0, t).allclose(torch.full((4,), 0.25))
    assert d.loss(z0, z0, t).abs().max() == 0


def test_p2_on_the_eps_loss_is_p2_as_defined():
    """p2_target=eps: the P2 weight 1/(1 + SNR) on the ε MSE (Choi et al.), computed from the ẑ0 prediction;
    the released x0 target weighs the same ẑ0 error 1/SNR_t less (vanishingly little where z_t is clean)."""
    eps_d, x0_d = _diff(p2_target="eps"), _diff()
    g = torch.Generator().manual_seed(0)
    z0, noise, pred = torch.randn(4, E, generator=g), torch.randn(4, E, generator=g), torch.randn(4, E, generator=g)
    t = torch.tensor([0, 10, 500, 999])
    zero, one = torch.zeros(4, E), torch.ones(4, E)
    zt = eps_d.q_sample(z0, t, zero, one, noise)
    a = eps_d.alphas_cumprod[t].float()[:, None]
    eps_hat = (zt - a.sqrt() * pred) / (1 - a).sqrt()  # the ε the ẑ0 prediction implies
    p2 = 1 / (1 + a / (1 - a))
    torch.testing.assert_close(eps_d.loss(pred, z0, t), (p2 * (eps_hat - noise) ** 2).mean(1), rtol=1e-4, atol=1e-6)
    snr = (a / (1 - a))[:, 0]
    torch.testing.assert_close(x0_d.loss(pred, z0, t), eps_d.loss(pred, z0, t) / snr, rtol=1e-4, atol=1e-8)
    with pytest.raises(ValueError, match="p2_target"):
        _diff(p2_target="v")


def test_respace_and_bad_input():
    assert respace(1000, 8)[0] == 999 and respace(1000, 8)[-1] == 0 and len(set(respace(1000, 64))) == 64
    assert respace(1000, 1000) == list(range(999, -1, -1))
    with pytest.raises(ValueError, match="steps"):
        respace(1000, 0)
    with pytest.raises(ValueError, match="sample_variance"):
        _diff(sample_variance="medium")
    with pytest.raises(ValueError, match="sigma"):
        _diff().frame(torch.zeros(1, E), None, torch.zeros(1, E))
