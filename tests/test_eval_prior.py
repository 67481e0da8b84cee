"""vqd-eval for a `task: prior` run: G's DALLE2-style cosine metrics at several step counts, hosted by the job."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from eval_ranks import run_eval_ranks
from vqd_scale.cli import eval as cli
from vqd_scale.config import save_config
from vqd_scale.families import load_config
from vqd_scale.data import schema
from vqd_scale.data.clusters import save_clusters
from vqd_scale.eval import job
from vqd_scale.families.prior import evaluate as prior_eval
from vqd_scale.families import build_task

N, E = 7, 32


def _prior_run(tmp_path, n=N):
    """A task=prior run dir with one complete checkpoint (step 5) and n held-out pairs; (run, cfg, tokens, img_emb)."""
    import webdataset as wds
    g = torch.Generator().manual_seed(0)
    save_clusters(tmp_path / "clusters.safetensors", {"means": F.normalize(torch.randn(2, E, generator=g), dim=-1),
                                                     "stds": 0.1 + 0.05 * torch.rand(2, E, generator=g),
                                                     "counts": torch.tensor([5, 5])}, {"shards": "test"})
    overrides = ["task=prior", "text.model=tiny", "prior.embed_dim=32", "prior.context_dim=64", "prior.num_components=2",
                 f"shifted.clusters={tmp_path}/clusters.safetensors", "shifted.num_timesteps=20", "shifted.sample_steps=5",
                 f"eval.shards={tmp_path}/held.tar", f"eval.num_samples={n}", "eval.prior_steps=[2,5]",
                 "logging.wandb_mode=disabled"]
    cfg = load_config(None, overrides)
    task = build_task(cfg, torch.device("cpu"))
    captions = [f"a {c} {s}" for c, s in zip(["red", "blue", "green", "yellow"] * 2, ["circle", "square"] * 4)] * (n // 8 + 1)
    captions = [f"{c} {i}" for i, c in enumerate(captions[:n])] if n > N else captions[:n]
    tokens = task.text.tokenize(captions).numpy()
    img_emb = F.normalize(torch.randn(n, E, generator=g), dim=-1).numpy()
    with wds.TarWriter(str(tmp_path / "held.tar"), encoder=False) as sink:
        for i in range(n):
            sink.write(schema.encode_record(f"{i:04d}", np.zeros((2, 2)), tokens[i], captions[i], {},
                                            image_emb=img_emb[i]))
    run = tmp_path / "run"
    d = run / "checkpoints" / "step_00000005"
    d.mkdir(parents=True)
    save_config(cfg, run / "config.yaml")
    save_file({k: v.contiguous() for k, v in task.module.state_dict().items()}, str(d / "ema.safetensors"))
    (d / "complete.json").write_text(json.dumps({"step": 5, "samples_seen": 40, "model": task.model_config}))
    return run, cfg, tokens, img_emb


def test_prior_run_evaluated_with_chunk_weighted_cosines(tmp_path, monkeypatch):
    run, cfg, tokens, img_emb = _prior_run(tmp_path)
    monkeypatch.setattr(prior_eval, "PRIOR_BATCH", 3)  # chunks of 3 and 4 (a last chunk of 1 joins the previous)
    assert cli.main([str(run), "--once"]) == 0
    m = json.loads((run / "eval" / "5.json").read_text())["metrics"]
    for steps in (2, 5):
        for k in ("sim_pred_image", "sim_pred_text", "sim_unrelated_image", "sim_text_image"):
            assert -1.0 <= m[f"prior/{k}@{steps}"] <= 1.0
    # The text-image baseline over all pairs, computed independently (text embeddings from the same tower,
    # as the job has no stored text_emb): equal only if the chunk means are weighted by chunk size.
    torch.manual_seed(cfg.seed)
    text = build_task(cfg, torch.device("cpu")).text
    text_emb = text.embed(torch.from_numpy(tokens).long())
    expect = F.cosine_similarity(text_emb, torch.from_numpy(img_emb).float().half().float(), dim=-1).mean().item()
    assert m["prior/sim_text_image@2"] == pytest.approx(expect, abs=1e-5)
    assert (run / "eval" / "curves.png").exists() and not (run / "eval" / "5.png").exists()
    # the result names the prior sampling that made it (an eval override here), not the VQ sampler's settings
    assert cli.main([str(run), "--step", "5", "--force", "shifted.guidance_scale=2.5"]) == 0
    res = json.loads((run / "eval" / "5.json").read_text())
    assert res["sampler"] == {"steps": [2, 5], "guidance_scale": 2.5, "kappa": cfg.shifted.kappa,
                              "sample_variance": "large", "clamp_x0": False, "shifted": True}


def test_mixture_comes_from_the_checkpoint_not_the_clusters_file(tmp_path):
    """The checkpoint carries the mixture: eval works with the clusters file gone or refit for another run."""
    run, cfg, _, _ = _prior_run(tmp_path)
    assert cli.main([str(run), "--once"]) == 0
    before = json.loads((run / "eval" / "5.json").read_text())["metrics"]
    (tmp_path / "clusters.safetensors").unlink()
    assert cli.main([str(run), "--step", "5", "--force"]) == 0
    assert json.loads((run / "eval" / "5.json").read_text())["metrics"] == before
    save_clusters(tmp_path / "clusters.safetensors", {"means": torch.randn(3, E), "stds": torch.ones(3, E),
                                                     "counts": torch.tensor([1, 1, 1])}, {"shards": "refit"})
    assert cli.main([str(run), "--step", "5", "--force"]) == 0  # k=3 now: was refused as num_components=2
    assert json.loads((run / "eval" / "5.json").read_text())["metrics"] == before


@pytest.mark.parametrize("n,size,world", [(7, 3, 1), (7, 3, 2), (10, 4, 3), (2, 256, 4), (9, 2, 2)])
def test_chunk_layout_covers_every_sample_once(n, size, world):
    per_rank = [job.Ranks(rank=r, world=world).chunks(n, size) for r in range(world)]
    ids = sorted(k for chunks in per_rank for k, _ in chunks)
    idx = sorted(i for chunks in per_rank for _, c in chunks for i in c)
    assert idx == list(range(n)) and ids == list(range(len(ids)))
    assert all(len(c) >= 2 for chunks in per_rank for _, c in chunks)  # batch statistics need two


def test_heldout_embeddings_of_another_clip_are_refused(tmp_path):
    """Cosines against embeddings of another CLIP model are meaningless: refused by width or manifest name."""
    import webdataset as wds
    run, cfg, tokens, _ = _prior_run(tmp_path)
    other = tmp_path / "other"
    other.mkdir()
    with wds.TarWriter(str(other / "held.tar"), encoder=False) as sink:
        for i in range(N):
            sink.write(schema.encode_record(f"{i:04d}", np.zeros((2, 2)), tokens[i], "x", {},
                                            image_emb=np.ones(E // 2, np.float32)))
    with pytest.raises(ValueError, match="16-d image embeddings but prior.embed_dim=32"):
        cli.main([str(run), "--once", f"eval.shards={other}/held.tar"])
    for d, model in ((tmp_path, "ViT-B-32"), (tmp_path / "train", "ViT-L-14")):
        d.mkdir(exist_ok=True)
        (d / "manifest.json").write_text(json.dumps({"format": schema.FORMAT, "embedding_model": {"model": model}}))
    with pytest.raises(ValueError, match="trained on ViT-L-14 embeddings.*ViT-B-32"):
        cli.main([str(run), "--once", f"data.manifest={tmp_path}/train"])
    assert not (run / "eval" / "5.json").exists()
    assert cli.main([str(run), "--once", f"data.manifest={tmp_path}/manifest.json"]) == 0  # same model: evaluated


@pytest.mark.slow
def test_prior_two_ranks_give_the_single_process_numbers_exactly(tmp_path):
    """3 chunks over 2 gloo ranks (rank 0: chunks 0 and 2): combined in chunk order, bit for bit as 1 process."""
    import shutil
    run, _, _, _ = _prior_run(tmp_path, n=2 * prior_eval.PRIOR_BATCH + 40)
    two = tmp_path / "two"
    shutil.copytree(run, two)
    assert cli.main([str(run), "--once"]) == 0
    run_eval_ranks([str(two), "--once"])
    one, par = (json.loads((d / "eval" / "5.json").read_text()) for d in (run, two))
    assert par["world_size"] == 2 and par["metrics"] == one["metrics"]
