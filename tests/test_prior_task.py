"""Prior task with the real tiny open_clip text tower: loss, learning, sampling, CFG, metrics, errors."""
import pytest
import torch
import torch.nn.functional as F

from vqd_scale.config import PriorConfig, ShiftedDiffusionConfig, TextEncoderConfig
from vqd_scale.data.clusters import save_clusters
from vqd_scale.eval.prior_metrics import prior_metrics, prior_metrics_from_batch
from vqd_scale.models.prior import PriorModel
from vqd_scale.tasks.prior import PriorTask, sample_embeddings

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
    assert (task.module.mixture.stds() > 0.049).all() and (task.module.mixture.stds() < 0.101).all()  # clusters loaded
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
    # clamp keeps ẑ0 — and with one step the sample — within μ ± 3σ of the chosen component
    one = sample_embeddings(model, diff, te, ctx, 1, torch.Generator().manual_seed(0), clamp_x0=True)
    assert ((one - mu).abs() <= 3 * sd + 1e-5).all()
    # guidance 3 with one step: ẑ0 = u + 3 (c − u), both branches at z_T from the same generator
    g = torch.Generator().manual_seed(5)
    zT = mu + sd * torch.randn(mu.shape, generator=g)
    t = torch.full((2,), 999)
    cond, uncond = model.denoise(zT, t, te, c, ctx), model.denoise(zT, t, te, c, None)
    guided = sample_embeddings(model, diff, te, ctx, 1, torch.Generator().manual_seed(5), guidance_scale=3.0)
    torch.testing.assert_close(guided, uncond + 3 * (cond - uncond), rtol=1e-4, atol=1e-5)


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
