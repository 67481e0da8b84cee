"""Eval metrics: Fréchet maths against independent oracles, CLIP score, feature extractors."""
import numpy as np
import pytest
import torch

from vqd_scale.eval import metrics as M


def _spd(rng, d, scale=1.0):
    a = rng.normal(size=(d, d))
    return scale * (a @ a.T / d + 0.1 * np.eye(d))


def _fd_symmetric(mu1, s1, mu2, s2):
    """Independent oracle: tr((Σ1Σ2)^½) = tr((Σ1^½ Σ2 Σ1^½)^½), computed with symmetric eigendecompositions."""
    def psd_sqrt(s):
        w, v = np.linalg.eigh(s)
        return (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    r = psd_sqrt(s1)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(psd_sqrt(r @ s2 @ r)))


def test_frechet_closed_form_diagonal_and_commuting():
    rng = np.random.default_rng(0)
    d = 6
    a, b = rng.uniform(0.2, 3, d), rng.uniform(0.2, 3, d)
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    # Diagonal (and, rotated by the same Q, commuting) covariances: d² = |Δμ|² + Σ (√a − √b)².
    expect = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert M.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expect, rel=1e-9)
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    s1, s2 = q @ np.diag(a) @ q.T, q @ np.diag(b) @ q.T
    assert M.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expect, rel=1e-7)
    # 1-D: the W2 distance between Gaussians, (m1 − m2)² + (σ1 − σ2)².
    assert M.frechet_distance([1.0], [[4.0]], [-0.5], [[9.0]]) == pytest.approx(1.5 ** 2 + 1.0, rel=1e-12)


def test_frechet_general_matches_independent_oracles():
    rng = np.random.default_rng(1)
    d = 10
    mu1, mu2, s1, s2 = rng.normal(size=d), rng.normal(size=d), _spd(rng, d), _spd(rng, d, 2.0)
    ours = M.frechet_distance(mu1, s1, mu2, s2)
    assert ours == pytest.approx(_fd_symmetric(mu1, s1, mu2, s2), rel=1e-7)
    M.import_open_clip()  # pytorch_fid imports torchvision: needs the compat shim on CPU torch
    fid_score = pytest.importorskip("pytorch_fid.fid_score")
    assert ours == pytest.approx(fid_score.calculate_frechet_distance(mu1, s1, mu2, s2), rel=1e-9)


def test_fid_self_zero_and_mean_shift_closed_form():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(400, 8)) @ rng.normal(size=(8, 8))
    assert abs(M.fid_from_features(x, x)) < 1e-6
    for k in (0.5, 1.0, 2.0):
        delta = k * rng.normal(size=8)
        fd = M.fid_from_features(x, x + delta)  # same covariance: d² = |δ|² exactly
        assert fd == pytest.approx((delta ** 2).sum(), rel=1e-6)
    # Growing shift along a fixed direction grows the distance quadratically.
    u = np.ones(8) / np.sqrt(8)
    fds = [M.fid_from_features(x, x + s * u) for s in (1.0, 2.0, 4.0)]
    assert fds == pytest.approx([1.0, 4.0, 16.0], rel=1e-6)


def test_fid_fewer_samples_than_dims_is_finite_and_torch_input():
    rng = np.random.default_rng(3)
    a, b = torch.from_numpy(rng.normal(size=(6, 16))), torch.from_numpy(rng.normal(size=(6, 16)) + 3)
    fd = M.fid_from_features(a, b)  # singular covariances: the ε fallback keeps it finite
    assert np.isfinite(fd) and fd > 16 * 9 * 0.5


def test_frechet_bad_input_is_refused():
    with pytest.raises(ValueError, match="same feature extractor"):
        M.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(ValueError, match="num_samples"):
        M.gaussian_stats(np.zeros((1, 4)))
    with pytest.raises(ValueError, match="non-finite"):
        M.gaussian_stats(np.array([[0.0, np.nan], [1.0, 2.0]]))


def test_stats_roundtrip(tmp_path):
    rng = np.random.default_rng(4)
    mu, sigma = M.gaussian_stats(rng.normal(size=(50, 5)))
    M.save_stats(tmp_path / "ref.npz", mu, sigma)
    mu2, sigma2 = M.load_stats(tmp_path / "ref.npz")
    assert np.array_equal(mu, mu2) and np.array_equal(sigma, sigma2)
    with pytest.raises(FileNotFoundError, match="reference_stats"):
        M.load_stats(tmp_path / "missing.npz")


def test_clip_score_definition():
    e = torch.nn.functional.normalize(torch.randn(3, 16), dim=-1)
    assert torch.allclose(M.clip_score(e, e), torch.full((3,), 100.0))
    assert torch.allclose(M.clip_score(e, -e), torch.zeros(3))  # negative cosine clipped at 0
    o = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    assert torch.allclose(M.clip_score(o, torch.tensor([[0.0, 1.0], [1.0, 0.0]])), torch.tensor([0.0, 60.0]))
    with pytest.raises(ValueError, match="paired"):
        M.clip_score(e, e[:2])


def test_tiny_clip_features_and_refusals(tmp_path):
    torch.manual_seed(0)
    ext = M.FEATURE_EXTRACTORS["clip"]("tiny", None, None)
    imgs = torch.rand(4, 3, 24, 24) * 2 - 1
    f = ext(imgs)
    assert f.shape == (4, 16) and torch.allclose(f.norm(dim=-1), torch.ones(4), atol=1e-5)
    t = ext.text(["a red circle at the top left", "a blue square in the center"])
    assert t.shape == (2, 16)
    # Saved weights reload to identical features (the weights really come from the file).
    torch.save(ext.model.state_dict(), tmp_path / "clip.pt")
    torch.manual_seed(1)
    ext2 = M.ClipFeatures("tiny", str(tmp_path / "clip.pt"))
    assert torch.allclose(ext2(imgs), f, atol=1e-6)
    with pytest.raises(ValueError, match="clip_weights"):
        M.ClipFeatures("ViT-B-32", None)
    with pytest.raises(ValueError, match="feature_weights"):
        M.FEATURE_EXTRACTORS["inception"]("tiny", None, None)


def test_prior_cosines():
    img = torch.nn.functional.normalize(torch.randn(5, 8), dim=-1)
    txt = torch.nn.functional.normalize(torch.randn(5, 8), dim=-1)
    rows = M.prior_cosine_rows(img, img, txt, -img)
    out = dict(zip(M.PRIOR_KEYS, rows.mean(0).tolist()))
    assert rows.shape == (5, 4)
    assert out["sim_pred_image"] == pytest.approx(1.0) and out["sim_unrelated_image"] == pytest.approx(-1.0)
    assert out["sim_pred_text"] == pytest.approx(out["sim_text_image"])
    assert out["sim_text_image"] == pytest.approx(float((img * txt).sum(-1).mean()), abs=1e-6)


def test_attribute_hits_on_rendered_synthetic_images():
    from vqd_scale.data.synthetic import SyntheticSpec, make_sample
    spec = SyntheticSpec(resolution=64)
    imgs, caps = [], []
    for i in range(4):
        img, cap, _ = make_sample(spec, 0, i)
        imgs.append(torch.from_numpy(np.array(img)).permute(2, 0, 1).float() / 127.5 - 1)  # HWC uint8 → CHW [-1,1]
        caps.append(cap)
    images = torch.stack(imgs)
    right = M.attribute_summary(M.attribute_hits(caps, images))
    assert right == {"attr_color": 1.0, "attr_shape": 1.0, "attr_position": 1.0, "attr_count": 1.0, "attr_all": 1.0}
    # The same images against the captions shifted by one: colour/shape/position mostly wrong.
    wrong = M.attribute_summary(M.attribute_hits(caps[1:] + caps[:1], images))
    assert wrong["attr_all"] < 1.0 and min(wrong.values()) < 1.0


def test_inception_from_local_weights_only(tmp_path):
    M.import_open_clip()
    inception = pytest.importorskip("pytorch_fid.inception")
    # Random weights with the FID network's keys (its blocks differ from torchvision's in forward only).
    net = inception._inception_v3(num_classes=1008, aux_logits=False, weights=None, init_weights=False)
    sd = net.state_dict()
    path = tmp_path / "inception.pth"
    torch.save(sd, path)
    ext = M.FEATURE_EXTRACTORS["inception"]("tiny", None, str(path))
    assert torch.equal(ext.net.blocks[0][0].conv.weight, sd["Conv2d_1a_3x3.conv.weight"])
    f = ext(torch.rand(2, 3, 32, 32) * 2 - 1)
    assert f.shape == (2, 2048) and torch.isfinite(f).all()
