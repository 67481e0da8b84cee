"""Samplers: fixed-x0 recovery, skip-step schedule, truncation, guidance, purity, reproducibility."""
import math

import pytest
import torch

from vqd_scale.config import DiscreteDiffusionConfig, SamplerConfig
from vqd_scale.diffusion.discrete import LOG_EPS, MaskAndReplace, log_onehot, sample_categorical
from vqd_scale.diffusion.sampling import guide, purity_counts, sample, timesteps, truncate

K, T = 6, 100


def diffusion(preset="released"):
    return MaskAndReplace(DiscreteDiffusionConfig(preset=preset, num_timesteps=T), K)


class Recorder:
    """denoise that always predicts a fixed x0 and records what it was called with."""

    def __init__(self, x0):
        self.x0, self.calls = x0, []

    def __call__(self, x_t, t):
        self.calls.append((x_t.clone(), t.clone()))
        return log_onehot(self.x0, K), None


def random_denoise(seed):
    g = torch.Generator().manual_seed(seed)
    table = torch.log_softmax(torch.randn(T, K, 16, generator=g) * 2, 1)
    return lambda x_t, t: (table[t], None)  # [B,K,16], depends on t only


@pytest.mark.parametrize("preset", ["released", "paper"])
def test_full_sampling_recovers_fixed_x0(preset):
    x0 = torch.randint(0, K, (3, 16), generator=torch.Generator().manual_seed(0))
    rec = Recorder(x0)
    out = sample(diffusion(preset), rec, 3, 16, SamplerConfig(steps=T), torch.Generator().manual_seed(1))
    assert torch.equal(out, x0)
    assert [int(t[0]) for _, t in rec.calls] == list(range(T - 1, -1, -1))
    masked = [int((x == K).sum()) for x, _ in rec.calls]
    assert masked[0] == 3 * 16 and all(a >= b for a, b in zip(masked, masked[1:]))  # absorbing
    if preset == "released":  # no replacement: every unmasked token along the way is already x0
        assert all(bool(((x == x0) | (x == K)).all()) for x, _ in rec.calls)


def test_skip_step_visits_expected_timesteps():
    d = diffusion("paper")
    seen = []
    orig = d.p_sample

    def spy(log_x0, x_t, t, t_prev=None, generator=None):
        seen.append((int(t[0]), int(t_prev[0])))
        return orig(log_x0, x_t, t, t_prev, generator)

    d.p_sample = spy
    x0 = torch.randint(0, K, (2, 16), generator=torch.Generator().manual_seed(2))
    rec = Recorder(x0)
    out = sample(d, rec, 2, 16, SamplerConfig(steps=25), torch.Generator().manual_seed(3))
    visited = [int(t[0]) for _, t in rec.calls]
    assert visited == timesteps(T, 25) and len(visited) == 25
    assert visited[0] == T - 1 and visited[-1] == 0
    gaps = [a - b for a, b in zip(visited, visited[1:])]
    assert set(gaps) <= {4, 5}  # evenly spaced: 99/24 ≈ 4.1
    assert seen == list(zip(visited[:-1], visited[1:]))  # posterior toward the next visited t
    assert torch.equal(out, x0)
    with pytest.raises(ValueError, match="steps"):
        sample(d, rec, 2, 16, SamplerConfig(steps=T + 1))


def test_truncation_keeps_top1_and_removes_tail():
    p = torch.tensor([0.05, 0.5, 0.15, 0.3]).log().view(1, 4, 1)
    kept = truncate(p, 0.7) > LOG_EPS  # mass before: 0.5 → 0, 0.3 → 0.5, 0.15 → 0.8
    assert kept.view(-1).tolist() == [False, True, False, True]
    assert torch.equal(truncate(p, 0.7)[kept], p[kept])  # kept values untouched
    assert (truncate(p, 1e-6) > LOG_EPS).view(-1).tolist() == [False, True, False, False]
    g = torch.Generator().manual_seed(4)
    lp = torch.log_softmax(torch.randn(4, 50, 30, generator=g) * 2, 1)
    for r in (0.3, 0.86):
        kept = truncate(lp, r) > LOG_EPS
        srt, order = lp.sort(1, descending=True)
        k_sorted = kept.gather(1, order)
        n_kept = k_sorted.sum(1, keepdim=True)
        assert torch.equal(k_sorted, torch.arange(50).view(1, 50, 1) < n_kept)  # a prefix, top-1 in it
        mass = srt.exp().cumsum(1)
        before_last = mass.gather(1, n_kept - 1) - srt.exp().gather(1, n_kept - 1)
        assert (before_last < r).all() and (mass.gather(1, n_kept - 1) >= r - 1e-6).all()


def test_guidance():
    g = torch.Generator().manual_seed(5)
    c = torch.log_softmax(torch.randn(2, K, 8, generator=g), 1)
    u = torch.log_softmax(torch.randn(2, K, 8, generator=g), 1)
    assert torch.allclose(guide(c, u, 1.0), c, atol=1e-6)
    ref = u + 3.0 * (c - u)
    assert torch.allclose(guide(c, u, 3.0), ref - ref.logsumexp(1, keepdim=True), atol=1e-6)
    # s = 1 with an unconditional branch samples exactly what the cond branch alone samples
    cfg = SamplerConfig(steps=10, guidance_scale=1.0)
    both = sample(diffusion(), lambda x, t: (c, u), 2, 8, cfg, torch.Generator().manual_seed(6))
    cond = sample(diffusion(), lambda x, t: (c, None), 2, 8, cfg, torch.Generator().manual_seed(6))
    assert torch.equal(both, cond)


def test_truncation_applies_after_guidance():
    # cond's top-1 is code 1, but the guided distribution (s=3) ∝ c³/u² has top-1 code 0.
    c = torch.tensor([0.3, 0.45, 0.25] + [1e-9] * (K - 3)).log().view(1, K, 1).expand(2, K, 16)
    u = torch.tensor([0.1, 0.8, 0.1] + [1e-9] * (K - 3)).log().view(1, K, 1).expand(2, K, 16)
    cfg = SamplerConfig(steps=5, guidance_scale=3.0, truncation_rate=1e-3)
    out = sample(diffusion(), lambda x, t: (c, u), 2, 16, cfg, torch.Generator().manual_seed(7))
    assert (out == 0).all()


def test_purity_unmasks_scheduled_count_and_keeps_filled():
    table = torch.log_softmax(torch.randn(3, K, 16, generator=torch.Generator().manual_seed(9)), 1)
    rec = []

    def denoise(x_t, t):
        rec.append(x_t.clone())
        return table, None

    cfg = SamplerConfig(steps=7, purity=True, purity_temperature=1.0)
    out = sample(diffusion("paper"), denoise, 3, 16, cfg, torch.Generator().manual_seed(10))
    counts = purity_counts(16, 6)  # the 6 steps before the last fill everything
    assert sum(counts) == 16 and max(counts) - min(counts) <= 1
    for i, (a, b) in enumerate(zip(rec, rec[1:])):
        filled_a, filled_b = a != K, b != K
        assert (filled_b.sum(1) - filled_a.sum(1)).tolist() == [counts[i]] * 3
        assert torch.equal(b[filled_a], a[filled_a])  # filled tokens never change before the last step
    assert (rec[-1] != K).all() and (out != K).all()


def test_purity_last_step_redraws_every_position_from_the_final_prediction():
    """Official prior_rule: at t = 0 every position is drawn from p̃, the ones filled earlier too."""
    early = torch.full((2, K, 16), LOG_EPS)
    early[:, 1] = 0.0  # every step before the last is sure of code 1
    last = torch.full((2, K, 16), LOG_EPS)
    last[:, 4] = 0.0  # the final prediction is sure of code 4

    def denoise(x_t, t):
        return (last if int(t[0]) == 0 else early), None

    out = sample(diffusion(), denoise, 2, 16, SamplerConfig(steps=5, purity=True), torch.Generator().manual_seed(3))
    assert (out == 4).all(), out  # before the fix: all 1 (filled positions were kept)


def test_purity_prefers_confident_positions():
    # position 0 is certain, the rest uniform: with one token per step it is almost always filled first
    lp = torch.full((200, K, 4), -math.log(K))
    lp[:, :, 0] = LOG_EPS
    lp[:, 2, 0] = 0.0
    rec = []

    def denoise(x_t, t):
        rec.append(x_t.clone())
        return lp, None

    sample(diffusion(), denoise, 200, 4, SamplerConfig(steps=4, purity=True), torch.Generator().manual_seed(11))
    first = rec[1] != K  # after the first step exactly one position is filled
    assert first[:, 0].float().mean() > 0.6  # purity 1 vs 1/K: prob 1/(1 + 3/K) = 2/3 for K=6
    assert (rec[1][:, 0][first[:, 0]] == 2).all()


def test_same_seed_same_output():
    cfg = SamplerConfig(steps=20, truncation_rate=0.9)
    run = lambda seed: sample(diffusion("paper"), random_denoise(0), 4, 16, cfg, torch.Generator().manual_seed(seed))
    assert torch.equal(run(12), run(12))
    assert not torch.equal(run(12), run(13))


def test_sample_categorical_distribution():
    p = torch.tensor([0.1, 0.0, 0.2, 0.7])
    logits = (p.clamp(min=1e-45).log() + 50.0).view(1, 4, 1).expand(1, 4, 40000)  # unnormalised on purpose
    idx = sample_categorical(logits, torch.Generator().manual_seed(14))
    freq = torch.bincount(idx.view(-1), minlength=4).float() / 40000
    assert freq[1] == 0  # a zero-probability code is never drawn
    assert (freq - p).abs().max() < 5 * math.sqrt(0.25 / 40000)


def test_sample_categorical_never_draws_a_floored_code_even_when_u_is_zero(monkeypatch):
    """A uniform draw of exactly 0 (or one rounded up to the total) must not land on a LOG_EPS code."""
    lp = torch.full((1, 5, 2), LOG_EPS)
    lp[0, 2, :] = 0.0  # only code 2 is possible; codes 0, 1, 3, 4 are truncated
    for u in (0.0, 1.0):  # the two ends of the inverse CDF
        monkeypatch.setattr(torch, "rand", lambda *a, u=u, **k: torch.full(a[0], u))
        assert sample_categorical(lp).tolist() == [[2, 2]], u  # u = 0 drew code 0 before the fix


def test_truncation_matches_diffusers_pipeline():
    from vqd_scale.compat import import_open_clip

    import_open_clip()  # the pipeline module imports transformers → torchvision
    from diffusers.pipelines.deprecated.vq_diffusion.pipeline_vq_diffusion import VQDiffusionPipeline

    lp = torch.log_softmax(torch.randn(2, 40, 25, generator=torch.Generator().manual_seed(15)) * 2, 1)
    for r in (0.5, 0.86, 0.99):
        ref = VQDiffusionPipeline.truncate(None, lp, r)
        assert torch.equal(truncate(lp, r) > LOG_EPS, ref > -torch.inf)
    # boundary: r equal to the cumulative probability through some token (the next one must go)
    g = torch.Generator().manual_seed(16)
    for _ in range(40):
        lp = torch.log_softmax(torch.randn(1, 16, 64, generator=g) * 2, 1)
        k = int(torch.randint(0, 15, (1,), generator=g))
        r = float(lp.sort(1, descending=True).values.exp().cumsum(1)[0, k, 0])
        ref = VQDiffusionPipeline.truncate(None, lp, r)
        assert torch.equal(truncate(lp, r) > LOG_EPS, ref > -torch.inf), (k, r)


def test_bad_denoise_shape_is_named():
    bad = lambda x, t: (torch.zeros(x.shape[0], K + 1, x.shape[1]), None)
    with pytest.raises(ValueError, match="denoise returned"):
        sample(diffusion(), bad, 1, 4, SamplerConfig(steps=2))
