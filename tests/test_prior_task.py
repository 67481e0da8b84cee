"""Prior task with the real tiny open_clip text tower: loss, learning, sampling, CFG, metrics, errors."""
import pytest
import torch
import torch.nn.functional as F

from vqd_scale.config import PriorConfig, ShiftedDiffusionConfig, TextEncoderConfig
from vqd_scale.data.clusters import save_clusters
from vqd_scale.families.prior.metrics import prior_metrics, prior_metrics_from_batch
from vqd_scale.models.prior import PriorModel
from vqd_scale.families.prior.task import PriorTask, sample_embeddings

TEXT = TextEncoderConfig(model="tiny")
E, W = TEXT.tiny_embed_dim, TEXT.tiny_width
CAPTIONS = ["a red square", "a blue circle", "two green triangles", "a yellow star"]


@pytest.fixture(scope="module")
def text_encoder():
    from vqd_scale.models.text import FrozenCLIPTextEncoder
    return FrozenCLIPTextEncoder(TEXT)


@pytest.fixture(scope="module")
def clusters(tmp_path_factory):
    g = torch.Generator().manual_seed(0)
    path = tmp_path_factory.mktemp("cl") / "clusters.safetensors"
    save_clusters(path, {"means": F.normalize(torch.randn(4, E, generator=g), dim=-1),
                         "stds": 0.05 + 0.05 * torch.rand(4, E, generator=g),
                         "counts": torch.tensor([10, 20, 30, 40])}, {"shards": "test"})
    return str(path)


def _task(text_encoder, clusters, **shifted):
    pcfg = PriorConfig(embed_dim=E, context_dim=W, context_len=77, num_components=4)
    return PriorTask(pcfg, ShiftedDiffusionConfig(clusters=clusters, **shifted), TEXT, torch.device("cpu"),
                     text_encoder=text_encoder)


def _batch(text_encoder, with_text_emb=True):
    g = torch.Generator().manual_seed(1)
    b = {"text_tokens": text_encoder.tokenize(CAPTIONS), "drop_text": torch.zeros(4, dtype=torch.bool),
         "image_emb": F.normalize(torch.randn(4, E, generator=g), dim=-1).half()}
    if with_text_emb:
        b["text_emb"] = text_encoder.embed(b["text_tokens"]).half()
    return b


def test_loss_learns_a_fixed_batch(text_encoder, clusters):
    torch.manual_seed(0)
    task = _task(text_encoder, clusters, text_dropout=0.0)
    sd = task.module.mixture.stds() / E ** 0.5  # clusters loaded, scaled into the prior's space z = √E·e
    assert (sd > 0.049).all() and (sd < 0.101).all()
    assert not any(p.requires_grad for p in task.module.mixture.parameters())  # fixed mixture: not trained
    batch = _batch(text_encoder)
    opt = torch.optim.Adam(task.module.parameters(), lr=3e-3)
    losses = []
    for _ in range(25):
        loss, m = task.loss(task.module, batch, torch.Generator().manual_seed(0))  # same t, ε every step
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert {"loss", "mse", "cos_x0"} <= set(m) and all(v.dim() == 0 for v in m.values())
    assert losses[-1] < 0.3 * losses[0]
    # the text embedding is computed by the frozen tower when the batch has none: same loss
    a, _ = task.loss(task.module, batch, torch.Generator().manual_seed(3))
    b, _ = task.loss(task.module, _batch(text_encoder, with_text_emb=False), torch.Generator().manual_seed(3))
    torch.testing.assert_close(a, b, rtol=1e-2, atol=1e-4)  # stored text_emb is float16


def test_learnable_mixture_trains_its_components(text_encoder, clusters):
    task = _task(text_encoder, clusters, learnable_mixture=True)
    loss, m = task.loss(task.module, _batch(text_encoder), torch.Generator().manual_seed(0))
    assert "mixture_pull" in m and "mixture_push" in m
    torch.testing.assert_close(loss.detach(), m["mse"] + m["mixture_pull"] + m["mixture_push"])
    loss.backward()
    assert task.module.mixture.mean_offset.grad.abs().sum() > 0


def test_prior_space_is_unit_embeddings_times_sqrt_e(text_encoder, clusters):
    """The prior trains on z = √E·e/‖e‖ (per-dim RMS 1, the scale of the unit DDPM noise), not on the stored
    unit-norm e (per-dim RMS 1/√E, far below the noise, and a loss ~E× below the release's); samples come back
    on the unit sphere."""
    from vqd_scale.data.clusters import load_clusters
    task = _task(text_encoder, clusters, shifted=False)  # DDPM baseline: z_t = √ᾱ z0 + √(1−ᾱ) ε
    model = task.module
    shifted = _task(text_encoder, clusters).module
    torch.testing.assert_close(shifted.mixture.means(), load_clusters(clusters)["means"] * E ** 0.5)
    batch = _batch(text_encoder)
    seen = []
    real_denoise = model.denoise
    model.denoise = lambda z, *a, **kw: (seen.append(z.clone()), real_denoise(z, *a, **kw))[1]
    try:
        t, noise = torch.zeros(4, dtype=torch.long), torch.zeros(4, E)  # t = 0: z_t = √ᾱ_0 z0 (ᾱ_0 = 1 − 1e-4)
        te = batch["text_emb"].float()
        loss, m = model(batch["image_emb"].float(), t, noise, te, None, torch.zeros(4, dtype=torch.bool))
        loss2, _ = model(3 * batch["image_emb"].float(), t, noise, 2 * te, None, torch.zeros(4, dtype=torch.bool))
    finally:
        del model.denoise
    z0 = F.normalize(batch["image_emb"].float(), dim=-1) * E ** 0.5
    torch.testing.assert_close(seen[0], z0 * (1 - 1e-4) ** 0.5)
    assert seen[0].pow(2).mean().sqrt().item() == pytest.approx(1.0, abs=1e-3)  # per-dim RMS 1
    with torch.no_grad():
        pred = real_denoise(seen[0], t, F.normalize(te, dim=-1) * E ** 0.5, torch.zeros(4, dtype=torch.long), None)
    torch.testing.assert_close(m["mse"], ((pred - z0) ** 2).mean(1).mul(1e-4).mean())  # P2 weight 1 − ᾱ_0 = β_0
    torch.testing.assert_close(loss2, loss)  # only the direction of a stored embedding counts
    gen = sample_embeddings(model.eval(), task.diffusion, te, None, 4, torch.Generator().manual_seed(0))
    torch.testing.assert_close(gen.norm(dim=-1), torch.ones(4))


def test_mixture_gets_no_gradient_through_z_t_and_its_losses_are_p2_weighted(text_encoder, clusters):
    """As released: q_sample is detached (the MSE alone would shrink σ_c: less noise is easier to denoise),
    and the pull/push losses are weighted per sample like the MSE."""
    task = _task(text_encoder, clusters, learnable_mixture=True)
    model, batch = task.module, _batch(text_encoder)
    z0, te = batch["image_emb"].float(), batch["text_emb"].float()
    g = torch.Generator().manual_seed(0)
    noise, aux_noise = torch.randn(4, E, generator=g), torch.randn(16, 4, E, generator=g)
    keep = torch.zeros(4, dtype=torch.bool)
    loss, m = model(z0, torch.full((4,), 500), noise, te, None, keep)  # no aux_noise: the MSE alone
    loss.backward()
    mix = model.mixture
    assert mix.mean_offset.grad is None or not mix.mean_offset.grad.any()
    assert mix.log_std_offset.grad is None or not mix.log_std_offset.grad.any()
    _, late = model(z0, torch.full((4,), 999), noise, te, None, keep, aux_noise)  # weight 1 − ᾱ_999 ≈ 1
    _, early = model(z0, torch.zeros(4, dtype=torch.long), noise, te, None, keep, aux_noise)  # weight β_0 = 1e-4
    for k in ("mixture_pull", "mixture_push"):
        assert early[k].item() == pytest.approx(late[k].item() * 1e-4 / (1 - task.diffusion.alphas_cumprod[-1].item()),
                                                rel=1e-4)


def test_sampling_is_stochastic_near_component_and_guided(text_encoder, clusters):
    """Issue #12 regression: two samples for the same text differ; CFG = lerp of the two branches."""
    task = _task(text_encoder, clusters, kappa=1.0)
    model, diff = task.module.eval(), task.diffusion
    tokens = text_encoder.tokenize([CAPTIONS[0]] * 2)
    ctx, te = text_encoder(tokens), text_encoder.embed(tokens)
    seen = []
    real_denoise = model.denoise
    model.denoise = lambda z, *args, **kw: (seen.append(z.clone()), real_denoise(z, *args, **kw))[1]
    try:
        a = sample_embeddings(model, diff, te, ctx, 8, torch.Generator().manual_seed(0))
    finally:
        del model.denoise  # back to the class method
    c, mu, sd, _ = model.mixture(te)
    y_T = (seen[0] - mu) / sd  # kappa = 1: z_T = μ_c + σ_c ε with the fitted (non-zero) stds
    assert 0.6 < y_T.std().item() < 1.4 and abs(y_T.mean().item()) < 0.4
    assert (y_T[0] - y_T[1]).abs().max() > 0.5  # independent draws per sample
    assert (a[0] - a[1]).abs().max() > 1e-5  # so the samples for one text differ
    b = sample_embeddings(model, diff, te, ctx, 8, torch.Generator().manual_seed(0))
    torch.testing.assert_close(a, b)  # reproducible from the generator
    # one step from z_T = μ + σε (κ = 1) returns ẑ0(z_T), clamped to μ ± 3σ, mapped back to the unit sphere
    zs = model.to_prior_space(te)  # the prior works in z = √E·e
    t = torch.full((2,), 999)
    zT = mu + sd * torch.randn(mu.shape, generator=torch.Generator().manual_seed(0))
    raw = model.denoise(zT, t, zs, c, ctx)
    assert ((raw - mu).abs() > 3 * sd).any()  # so the clamp below has work to do
    one = sample_embeddings(model, diff, te, ctx, 1, torch.Generator().manual_seed(0), clamp_x0=True)
    torch.testing.assert_close(one, F.normalize(torch.maximum(torch.minimum(raw, mu + 3 * sd), mu - 3 * sd), dim=-1))
    # guidance 3 with one step: ẑ0 = u + 3 (c − u), both branches at z_T from the same generator
    g = torch.Generator().manual_seed(5)
    zT = mu + sd * torch.randn(mu.shape, generator=g)
    cond, uncond = model.denoise(zT, t, zs, c, ctx), model.denoise(zT, t, zs, c, None)
    guided = sample_embeddings(model, diff, te, ctx, 1, torch.Generator().manual_seed(5), guidance_scale=3.0)
    torch.testing.assert_close(guided, F.normalize(uncond + 3 * (cond - uncond), dim=-1), rtol=1e-4, atol=1e-5)


def test_prior_metrics_keys_and_control(text_encoder, clusters):
    task = _task(text_encoder, clusters)
    model = PriorModel(task.cfg)
    model.load_state_dict(task.module.state_dict())  # the trained module's weights load into the plain model
    batch = _batch(text_encoder)
    m = prior_metrics_from_batch(model, text_encoder, task.shifted_cfg, batch, steps=(8, 2))
    assert {f"prior/{k}@{n}" for k in ("sim_pred_image", "sim_pred_text", "sim_unrelated_image",
                                       "sim_pred_unrelated_text") for n in (8, 2)} <= set(m)
    assert all(-1.0 <= v <= 1.0 for v in m.values())
    # identical captions: rolling changes nothing, so related and unrelated metrics coincide
    tokens = text_encoder.tokenize([CAPTIONS[0]] * 4)
    same = prior_metrics(model, task.shifted_cfg, batch["image_emb"], text_encoder.embed(tokens),
                         text_encoder(tokens), steps=(8,))
    assert same["prior/sim_pred_image@8"] == pytest.approx(same["prior/sim_unrelated_image@8"], abs=1e-6)
    assert same["prior/sim_pred_text@8"] == pytest.approx(same["prior/sim_pred_unrelated_text@8"], abs=1e-6)
    assert m["prior/sim_pred_image@8"] != pytest.approx(m["prior/sim_unrelated_image@8"], abs=1e-6)


def test_clear_errors(text_encoder, clusters):
    with pytest.raises(ValueError, match="shifted.clusters"):
        _task(text_encoder, None)
    with pytest.raises(ValueError, match="context_dim"):
        PriorTask(PriorConfig(embed_dim=E, context_dim=W + 1), ShiftedDiffusionConfig(clusters=clusters), TEXT,
                  torch.device("cpu"), text_encoder=text_encoder)
    with pytest.raises(ValueError, match="num_components"):
        PriorTask(PriorConfig(embed_dim=E, context_dim=W, num_components=3), ShiftedDiffusionConfig(clusters=clusters),
                  TEXT, torch.device("cpu"), text_encoder=text_encoder)
    task = _task(text_encoder, clusters)
    batch = _batch(text_encoder)
    with pytest.raises(ValueError, match="with_embeddings"):
        task.loss(task.module, {k: v for k, v in batch.items() if k != "image_emb"}, torch.Generator())
    with pytest.raises(ValueError, match="embed_dim"):
        task.loss(task.module, batch | {"image_emb": torch.zeros(4, E + 1)}, torch.Generator())
    # the unshifted baseline needs no clusters
    assert _task(text_encoder, None, shifted=False).module is not None


def test_text_dropout_is_drawn_once(text_encoder, clusters):
    """The loader draws the CFG dropout at shifted.text_dropout; the task must not drop again on top."""
    task = _task(text_encoder, clusters, text_dropout=0.5)
    seen = []
    hook = task.module.register_forward_pre_hook(lambda mod, args: seen.append(args[5].clone()))
    batch = _batch(text_encoder)
    for seed in range(8):  # all kept by the loader: none may be dropped (was ~1 − 0.5⁸ likely to drop one)
        task.loss(task.module, batch, torch.Generator().manual_seed(seed))
    batch["drop_text"] = torch.tensor([True, False, True, False])
    task.loss(task.module, batch, torch.Generator().manual_seed(0))
    no_loader_drop = {k: v for k, v in batch.items() if k != "drop_text"}
    drawn = torch.stack([task.loss(task.module, no_loader_drop, torch.Generator().manual_seed(s)) and seen[-1]
                         for s in range(50)]).float().mean()
    hook.remove()
    assert not torch.stack(seen[:8]).any()
    assert seen[8].tolist() == [True, False, True, False]
    assert 0.35 < drawn < 0.65  # without the loader's flags the task draws at text_dropout itself
