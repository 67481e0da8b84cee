"""tools/fit_prior_clusters.py over real WebDataset token shards: recovers known clusters, records the data."""
import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds

from vqd_scale.data import schema
from vqd_scale.data.clusters import load_clusters

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))
import fit_prior_clusters  # noqa: E402

E = 8


def _write_shards(root: Path, emb: np.ndarray, per_shard: int, with_emb: bool = True, text=None) -> str:
    n_shards = (len(emb) + per_shard - 1) // per_shard
    for s in range(n_shards):
        with wds.TarWriter(str(root / f"{s:05d}.tar")) as w:
            for i in range(s * per_shard, min(len(emb), (s + 1) * per_shard)):
                w.write(schema.encode_record(f"{i:08d}", np.zeros((2, 2)), np.zeros(77), f"caption {i}", {},
                                             image_emb=emb[i] if with_emb else None,
                                             text_emb=None if text is None else text[i]))
    return str(root / f"{{00000..{n_shards - 1:05d}}}.tar")


@pytest.fixture(scope="module")
def truth():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, E)) * 4.0
    stds = rng.uniform(0.2, 0.6, size=(3, E))
    lab = rng.integers(0, 3, size=900)
    emb = (centres[lab] + stds[lab] * rng.normal(size=(900, E))).astype(np.float16)
    return centres, stds, lab, emb


def test_fit_recovers_known_clusters_and_records_manifest(tmp_path, truth):
    centres, stds, lab, emb = truth
    pattern = _write_shards(tmp_path, emb, per_shard=250)
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps({"format": schema.FORMAT, "tokenizer_id": "vq-test-abc"}))
    out = tmp_path / "clusters.safetensors"
    assert fit_prior_clusters.main(["--shards", pattern, "--manifest", str(manifest), "--k", "3",
                                    "--out", str(out), "--chunk", "100"]) == 0
    cl = load_clusters(out)
    assert cl["means"].shape == (3, E) and cl["stds"].shape == (3, E)
    # match fitted components to the true ones by nearest mean (clusters live on the unit sphere)
    unit = torch.nn.functional.normalize(torch.tensor(centres, dtype=torch.float32), dim=-1)
    order = torch.cdist(unit, cl["means"]).argmin(1)
    assert sorted(order.tolist()) == [0, 1, 2]
    e = emb.astype(np.float32)
    e = (e / np.linalg.norm(e, axis=1, keepdims=True)).astype(np.float64)
    for c in range(3):
        members = e[lab == c]
        torch.testing.assert_close(cl["means"][order[c]], torch.tensor(members.mean(0), dtype=torch.float32),
                                   rtol=0, atol=1e-3)
        torch.testing.assert_close(cl["stds"][order[c]], torch.tensor(members.std(0), dtype=torch.float32),
                                   rtol=1e-3, atol=1e-3)
        assert int(cl["counts"][order[c]]) == int((lab == c).sum())
    meta = cl["metadata"]
    assert meta["manifest_sha256"] == hashlib.sha256(manifest.read_bytes()).hexdigest()
    assert meta["tokenizer_id"] == "vq-test-abc" and meta["shards"] == pattern and meta["k"] == "3"


def test_singleton_clusters_never_get_zero_std(tmp_path):
    emb = np.zeros((51, E), np.float32)
    emb[:50, 0], emb[50, 0] = 1.0, -1.0
    emb[:50] += 0.05 * np.random.default_rng(1).normal(size=(50, E))
    pattern = _write_shards(tmp_path, emb.astype(np.float16), per_shard=60)
    out = tmp_path / "c.safetensors"
    fit_prior_clusters.main(["--shards", pattern, "--k", "2", "--out", str(out)])
    cl = load_clusters(out)
    assert (cl["stds"] > 0).all()
    single = int(cl["counts"].argmin())
    assert int(cl["counts"][single]) == 1
    u = emb.astype(np.float16).astype(np.float32)
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    torch.testing.assert_close(cl["stds"][single], torch.tensor(u.std(0)), rtol=1e-3, atol=1e-4)  # global, not 0


def test_clusters_live_on_the_unit_sphere_whatever_the_stored_norms(tmp_path, truth):
    """The prior sees z = s·e/‖e‖: clusters fitted on rescaled embeddings must be the same clusters."""
    emb = truth[3]
    scaled = (emb.astype(np.float32) * np.random.default_rng(2).uniform(0.5, 3.0, size=(len(emb), 1)))
    unit = emb.astype(np.float32) / np.linalg.norm(emb.astype(np.float32), axis=1, keepdims=True)
    fits = []
    for name, e in (("scaled", scaled), ("unit", unit)):
        (tmp_path / name).mkdir()
        pattern = _write_shards(tmp_path / name, e.astype(np.float16), per_shard=300)
        fit_prior_clusters.main(["--shards", pattern, "--k", "3", "--out", str(tmp_path / f"{name}.safetensors")])
        fits.append(load_clusters(tmp_path / f"{name}.safetensors"))
    torch.testing.assert_close(fits[0]["means"].norm(dim=-1), fits[1]["means"].norm(dim=-1), rtol=0, atol=5e-3)
    torch.testing.assert_close(fits[0]["means"], fits[1]["means"], rtol=0, atol=5e-3)  # fp16 rounding apart
    torch.testing.assert_close(fits[0]["stds"], fits[1]["stds"], rtol=0, atol=5e-3)


def test_clear_errors(tmp_path, truth):
    emb = truth[3][:20]
    no_emb = _write_shards(tmp_path, emb, per_shard=20, with_emb=False)
    with pytest.raises(ValueError, match="img.emb.npy"):
        fit_prior_clusters.main(["--shards", no_emb, "--k", "2", "--out", str(tmp_path / "x.safetensors")])
    (tmp_path / "b").mkdir()
    few = _write_shards(tmp_path / "b", emb, per_shard=20)
    with pytest.raises(ValueError, match="fewer components"):
        fit_prior_clusters.main(["--shards", few, "--k", "50", "--out", str(tmp_path / "x.safetensors")])
    with pytest.raises(FileNotFoundError, match="shard"):
        fit_prior_clusters.main(["--shards", str(tmp_path / "nope_{0..1}.tar"), "--k", "2",
                                 "--out", str(tmp_path / "x.safetensors")])
    with pytest.raises(FileNotFoundError, match="fit_prior_clusters"):
        load_clusters(tmp_path / "missing.safetensors")



def test_max_samples_zero_is_refused_by_name(tmp_path, truth, capsys):
    shards = _write_shards(tmp_path, truth[3][:20], per_shard=20)
    with pytest.raises(SystemExit):
        fit_prior_clusters.main(["--shards", shards, "--k", "2", "--max-samples", "0",
                                 "--out", str(tmp_path / "x.safetensors")])
    assert "--max-samples" in capsys.readouterr().err and not (tmp_path / "x.safetensors").exists()


def test_caption_routed_spread_and_the_matched_kappa(tmp_path, capsys):
    """Pairs are routed by caption (argmax cos(text, μ_c)); when captions pick another cluster the spread the
    diffusion must cover is wider than the cluster std: reported as the matched κ, stored with --stds routed."""
    rng = np.random.default_rng(3)
    a, b = np.eye(E)[0], np.eye(E)[1]
    lab = rng.integers(0, 2, size=400)
    img = np.where(lab[:, None] == 0, a, b) + 0.1 * rng.normal(size=(400, E))
    wrong = rng.random(400) < 0.3  # 30 % of the captions point at the other cluster
    txt = np.where((lab == 0) ^ wrong, 1, 0)[:, None] * a + np.where((lab == 1) ^ wrong, 1, 0)[:, None] * b
    txt = txt + 0.05 * rng.normal(size=(400, E))
    img16, txt16 = img.astype(np.float16), txt.astype(np.float16)
    pattern = _write_shards(tmp_path, img16, per_shard=150, text=txt16)
    fits = {}
    for stds in ("cluster", "routed"):
        out = tmp_path / f"{stds}.safetensors"
        assert fit_prior_clusters.main(["--shards", pattern, "--k", "2", "--out", str(out), "--stds", stds]) == 0
        fits[stds] = load_clusters(out)
    printed = capsys.readouterr().out
    mu = fits["cluster"]["means"].double()
    torch.testing.assert_close(fits["routed"]["means"].double(), mu)
    u = torch.nn.functional.normalize(torch.tensor(img16, dtype=torch.float64), dim=-1)
    c = (torch.nn.functional.normalize(torch.tensor(txt16, dtype=torch.float64), dim=-1) @ mu.T).argmax(1)
    d2 = (u - mu[c]) ** 2
    expect = torch.stack([d2[c == j].mean(0).sqrt() for j in range(2)])
    torch.testing.assert_close(fits["routed"]["stds"].double(), expect, rtol=1e-4, atol=1e-5)
    # misrouted pairs lie far from μ_c along a − b; elsewhere the spread is the clusters' own
    assert (fits["routed"]["stds"][:, :2] > 3 * fits["cluster"]["stds"][:, :2]).all()
    torch.testing.assert_close(fits["routed"]["stds"][:, 2:], fits["cluster"]["stds"][:, 2:], rtol=0.2, atol=0)
    y_rms = (d2 / fits["cluster"]["stds"].double()[c] ** 2).mean().sqrt().item()
    assert y_rms > 2 and float(fits["cluster"]["metadata"]["y_rms_cluster_stds"]) == pytest.approx(y_rms, rel=1e-3)
    assert f"{y_rms:.3f}" in printed and fits["routed"]["metadata"]["stds"] == "routed"
    own = torch.cdist(u, mu).argmin(1)
    agree = (own == c).double().mean().item()
    assert 0.6 < agree < 0.8  # 30 % of the captions point at the other cluster
    assert float(fits["cluster"]["metadata"]["caption_picks_own_cluster"]) == pytest.approx(agree, abs=1e-4)
    assert f"{agree:.1%} of the captions pick their image's own cluster" in printed
    (tmp_path / "noText").mkdir()
    no_text = _write_shards(tmp_path / "noText", img16, per_shard=400)
    with pytest.raises(SystemExit):
        fit_prior_clusters.main(["--shards", no_text, "--k", "2", "--out", str(tmp_path / "x.safetensors"),
                                 "--stds", "routed"])
    assert "text embeddings" in capsys.readouterr().err
