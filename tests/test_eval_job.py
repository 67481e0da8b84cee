"""vqd-eval end to end on real tiny parts: tiny diffusers VQModel tokenizer, tiny open_clip text tower
and CLIP, the real transformer, held-out token shards written in the record format."""
import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from eval_ranks import run_eval_ranks
from vqd_scale.cli import eval as cli
from vqd_scale.config import save_config
from vqd_scale.families import load_config
from vqd_scale.data import schema
from vqd_scale.data.synthetic import caption_of, sample_scene, synthetic_images
from vqd_scale.eval import metrics as M
from vqd_scale.eval.heldout import read_heldout
from vqd_scale.families import build_task
from vqd_scale.models.vqvae import ImageTokenizer
from vqd_scale.rundir import load_weights

N, RES = 6, 16
OVERRIDES = ["task=vqd", "text.model=tiny", "text.tiny_width=32", "text.tiny_layers=1", "model.size=debug",
             "model.num_classes=64", "model.height=8", "model.width=8", "model.context_dim=32", "model.layers=1",
             "model.num_timesteps=10", "diffusion.num_timesteps=10", "eval.sampler.steps=4",
             "eval.sampler.batch_size=4", "eval.sampler.guidance_scale=2.0", f"eval.num_samples={N}",
             "eval.clip_model=tiny", "eval.metrics=[fid,clip_score,attributes]", "eval.grid_size=4",
             "logging.wandb_mode=offline", "max_samples=1000"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run directory with two complete checkpoints and one incomplete, plus held-out shards."""
    from vqd_scale.models.vqvae import VQModelTokenizer, _import_vqmodel

    VQModel = _import_vqmodel()  # through the compat shim (diffusers imports torchvision)

    root = tmp_path_factory.mktemp("eval_e2e")
    torch.manual_seed(0)
    vq = VQModel(block_out_channels=(32, 32), down_block_types=("DownEncoderBlock2D",) * 2,
                 up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, latent_channels=4,
                 num_vq_embeddings=64, norm_num_groups=8, sample_size=RES)
    vq.save_pretrained(str(root / "vq"))
    tok = VQModelTokenizer.from_diffusers(root / "vq", name="tiny-vq")
    tok.save(root / "tokenizer")
    # Held-out shards: synthetic captioned images → tokens, written with the record schema (2 shards).
    import webdataset as wds
    cfg = load_config(None, OVERRIDES)
    task = build_task(cfg, torch.device("cpu"))
    rng = np.random.default_rng(0)
    captions = [caption_of(sample_scene(rng)) for _ in range(N + 2)]
    ids = tok.encode(synthetic_images(N + 2, RES, seed=1)).numpy()
    text = task.text.tokenize(captions).numpy()
    for s in range(2):
        with wds.TarWriter(str(root / f"held_{s:05d}.tar"), encoder=False) as sink:
            for i in range(s * 4, s * 4 + 4):
                sink.write(schema.encode_record(f"{i:06d}", ids[i], text[i], captions[i],
                                                {"tokenizer_id": tok.tokenizer_id}))
    overrides = OVERRIDES + [f"eval.shards={root}/held_{{00000..00001}}.tar", f"eval.tokenizer={root}/tokenizer",
                             f"run_dir={root}/run"]
    run = root / "run"
    run.mkdir()
    save_config(load_config(None, overrides), run / "config.yaml")
    # As vqd-train does without text.pretrained: the random-init frozen text tower is saved in the run dir.
    save_file({k: v.contiguous() for k, v in task.text.state_dict().items()}, str(run / "text_encoder.safetensors"))
    for step, seed, complete in ((10, 1, True), (20, 2, True), (30, 3, False)):
        torch.manual_seed(seed)
        module = build_task(cfg, torch.device("cpu")).module
        d = run / "checkpoints" / f"step_{step:08d}"
        d.mkdir(parents=True)
        save_file({k: v.contiguous() for k, v in module.state_dict().items()}, str(d / "ema.safetensors"))
        if complete:
            (d / "complete.json").write_text(json.dumps({"step": step, "samples_seen": step * 16, "world_size": 1,
                                                         "model": task.model_config}))
    with open(run / "metrics.jsonl", "w") as f:
        for step in range(5, 31, 5):
            f.write(json.dumps({"step": step, "loss": 5.0 / step, "vlb": 4.0 / step}) + "\n")
    return run


def test_vqd_eval_end_to_end(run_dir):
    assert cli.main([str(run_dir), "--once"]) == 0
    ev = run_dir / "eval"
    assert sorted(p.name for p in ev.glob("*.json")) == ["10.json", "20.json"]  # step 30 is incomplete
    res = json.loads((ev / "20.json").read_text())
    m, nm = res["metrics"], res["not_meaningful"]  # the random tiny CLIP's FID / CLIP score are kept apart
    assert res["step"] == 20 and res["samples_seen"] == 320 and res["num_samples"] == N
    assert set(m) == {"attr_color", "attr_shape", "attr_position", "attr_count", "attr_all"} and set(nm) == {"fid", "clip_score"}
    assert set(res["metric_notes"]) == {"fid", "clip_score"} and "random `tiny` CLIP" in res["metric_notes"]["fid"]
    assert np.isfinite(nm["fid"]) and nm["fid"] >= 0 and 0 <= nm["clip_score"] <= 100
    assert all(0 <= m[k] <= 1 for k in ("attr_color", "attr_shape", "attr_position", "attr_all"))
    # Grid: 4 samples of 16 px upscaled 8× in a 2×2 grid, each with its held-out image beside it (after an
    # 8 px gutter) and its caption under it, 4 px gutters: 2·(128+8+128+4)+4 = 540 wide.
    png = np.asarray(Image.open(ev / "20.png")).astype(int)
    assert png.shape[1] == 540 and png[4:132, 4:132].std() > 0
    held = read_heldout(load_config(run_dir / "config.yaml").eval.shards, N)
    ref = ImageTokenizer.load(run_dir.parent / "tokenizer").decode(held.image_tokens[:1])  # the first caption's image
    ref = ((ref[0].permute(1, 2, 0).numpy() + 1) * 127.5).round().clip(0, 255)
    assert np.abs(png[4:132:8, 140:268:8] - ref).max() <= 1  # beside sample 0: its held-out image (nearest ×8)
    assert (png[133:145, 4:268] < 64).all(-1).sum() > 30  # dark caption text under the first cell
    assert Image.open(ev / "curves.png").size[0] > 100
    assert list((ev / "wandb").glob("offline-run-*")), "wandb offline run not written"
    assert not list(ev.glob("*.lock"))

    # Independent recomputation of step 20's FID and CLIP score from the public pieces.
    from vqd_scale.generate import generate
    cfg = load_config(run_dir / "config.yaml")
    task = build_task(cfg, torch.device("cpu"))
    task.module.load_state_dict(load_weights(run_dir / "checkpoints/step_00000020"))
    task.text.load_state_dict(load_file(str(run_dir / "text_encoder.safetensors")))
    h = read_heldout(cfg.eval.shards, N)
    tok = ImageTokenizer.load(cfg.eval.tokenizer)
    clip = M.ClipFeatures("tiny", None)
    # noise seeded per chunk of sampler.batch_size (chunk k: seed·1000003 + k), independent of the rank count
    imgs = torch.cat([tok.decode(generate(task.module, task.text, task.diffusion, h.text_tokens[i:i + 4], cfg.eval.sampler,
                                          torch.Generator().manual_seed(cfg.eval.seed * 1_000_003 + i // 4)).view(-1, 8, 8))
                      for i in range(0, N, 4)])
    fake, real = clip(imgs), clip(tok.decode(h.image_tokens))
    assert nm["fid"] == pytest.approx(M.fid_from_features(fake, real), rel=1e-5)
    assert nm["clip_score"] == pytest.approx(float(M.clip_score(fake, clip.text(h.captions)).mean()), rel=1e-5)
    (ref,) = ev.glob("reference_*.npz")  # real-image statistics cached for later evaluator processes
    mu, sigma = M.load_stats(ref)
    assert np.allclose(mu, M.gaussian_stats(real)[0]) and np.allclose(sigma, M.gaussian_stats(real)[1])

    # A second run finds nothing new; completing step 30 makes exactly that one pending.
    mtime = (ev / "20.json").stat().st_mtime_ns
    assert cli.main([str(run_dir), "--once"]) == 0
    assert (ev / "20.json").stat().st_mtime_ns == mtime and not (ev / "30.json").exists()
    (run_dir / "checkpoints/step_00000030/complete.json").write_text(json.dumps({"step": 30, "samples_seen": 480}))
    M.save_stats(ref, mu + 1.0, sigma)  # a new process must read the cache, not recompute: shift its mean
    assert cli.main([str(run_dir), "--step", "30"]) == 0
    assert json.loads((ev / "30.json").read_text())["not_meaningful"]["fid"] > 0.9 * mu.size  # ≈ |Δμ|² = D
    assert (ev / "20.json").stat().st_mtime_ns == mtime
    # Weights that do not fit the model (a parameter missing) are refused, naming the checkpoint; no result.
    bad = run_dir / "checkpoints/step_00000040"
    bad.mkdir()
    sd = load_file(str(run_dir / "checkpoints/step_00000020/ema.safetensors"))
    sd.pop("null_context")
    save_file(sd, str(bad / "ema.safetensors"))
    (bad / "complete.json").write_text(json.dumps({"step": 40}))
    with pytest.raises(ValueError, match="step_00000040.*do not fit"):
        cli.main([str(run_dir), "--step", "40"])
    assert not (ev / "40.json").exists() and not (ev / "40.lock").exists()
    # --force keeps the old result until a new one exists: a failed re-evaluation leaves it in place
    (ev / "40.json").write_text('{"old": true}')
    with pytest.raises(ValueError, match="do not fit"):
        cli.main([str(run_dir), "--step", "40", "--force"])
    assert json.loads((ev / "40.json").read_text()) == {"old": True} and not list(ev.glob("40.json.*"))
    assert cli.main([str(run_dir), "--step", "30", "--force"]) == 0  # a successful one replaces it
    assert "metrics" in json.loads((ev / "30.json").read_text()) and not list(ev.glob("30.json.*"))


def test_reference_cache_keyed_by_content_not_only_keys(run_dir, tmp_path):
    """Another held-out set reusing the record keys must not get the cached statistics of the first."""
    import shutil

    import webdataset as wds
    from vqd_scale.models.vqvae import ImageTokenizer
    run = tmp_path / "run"
    shutil.copytree(run_dir, run, ignore=shutil.ignore_patterns("eval"))
    cfg = load_config(run / "config.yaml")
    assert cli.main([str(run), "--step", "10", "logging.wandb_mode=disabled"]) == 0
    h = read_heldout(cfg.eval.shards, N)
    tok = ImageTokenizer.load(cfg.eval.tokenizer)
    ids = tok.encode(synthetic_images(N, RES, seed=7)).numpy()  # other images, the same keys and captions
    with wds.TarWriter(str(tmp_path / "other.tar"), encoder=False) as sink:
        for i in range(N):
            sink.write(schema.encode_record(h.keys[i], ids[i], h.text_tokens[i].numpy(), h.captions[i],
                                            {"tokenizer_id": tok.tokenizer_id}))
    assert cli.main([str(run), "--step", "20", "logging.wandb_mode=disabled", f"eval.shards={tmp_path}/other.tar"]) == 0
    assert len(list((run / "eval").glob("reference_*.npz"))) == 2
    clip = M.ClipFeatures("tiny", None)
    real = clip(tok.decode(torch.from_numpy(ids).long()))
    mu, _ = M.gaussian_stats(real)
    assert any(np.allclose(M.load_stats(p)[0], mu) for p in (run / "eval").glob("reference_*.npz"))


def test_metrics_that_do_not_apply_print_no_numbers(run_dir, tmp_path, capsys):
    """Real captions: no attr_*; random tiny CLIP: no FID / CLIP score among the metrics or on the console;
    rerunning with other metrics says that results are kept and how to redo one (--force)."""
    import shutil

    import webdataset as wds
    run = tmp_path / "run"  # steps 10 and 20 only (the end-to-end test may have added 30 and a bad 40)
    shutil.copytree(run_dir, run, ignore=shutil.ignore_patterns("eval", "step_00000030", "step_00000040"))
    h = read_heldout(load_config(run / "config.yaml").eval.shards, N)
    captions = [f"photo {i}: a man riding a bike at sunset" for i in range(N)]
    with wds.TarWriter(str(tmp_path / "real.tar"), encoder=False) as sink:
        for i in range(N):
            sink.write(schema.encode_record(h.keys[i], h.image_tokens[i].numpy(), h.text_tokens[i].numpy(),
                                            captions[i], {}))
    assert cli.main([str(run), "--step", "10", "logging.wandb_mode=disabled", f"eval.shards={tmp_path}/real.tar"]) == 0
    res = json.loads((run / "eval" / "10.json").read_text())
    assert res["metrics"] == {} and set(res["not_meaningful"]) == {"fid", "clip_score"}
    assert res["metric_notes"]["attributes"].startswith("not applicable")
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("[eval step 10]"))
    assert "fid: not meaningful" in line and "attributes: not applicable" in line and "=" not in line
    assert cli.main([str(run), "--once", "logging.wandb_mode=disabled", "eval.metrics=[fid]",
                     f"eval.shards={tmp_path}/real.tar"]) == 0  # evaluates step 20; step 10 is kept
    out = capsys.readouterr().out
    assert "step(s) 10 already have results for other metrics" in out and "--step 10 --force" in out
    assert cli.main([str(run), "--once", "logging.wandb_mode=disabled", f"eval.shards={tmp_path}/real.tar"]) == 0
    assert "step(s) 20 already" in capsys.readouterr().out  # only the step whose metrics differ is named

    assert cli.main([str(tmp_path)]) == 2
    assert "config.yaml not found" in capsys.readouterr().err
    assert cli.main([str(run_dir), "--step", "25"]) == 2
    assert "not a complete checkpoint" in capsys.readouterr().err
    assert cli.main([str(run_dir), "eval.metrics=[fid,bogus]"]) == 2
    assert "eval.metrics" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.parse_args([str(run_dir), "--force"])


def test_heldout_refusals(run_dir, tmp_path):
    cfg = load_config(run_dir / "config.yaml")
    with pytest.raises(ValueError, match="eval.num_samples"):
        read_heldout(cfg.eval.shards, 100)
    with pytest.raises(FileNotFoundError, match="not found"):
        read_heldout(str(tmp_path / "nope_{0..1}.tar"), 2)
    with pytest.raises(ValueError, match="eval.shards is empty"):
        read_heldout("", 2)


@pytest.mark.slow
def test_two_ranks_give_the_single_process_numbers(run_dir, tmp_path):
    """2 gloo ranks: chunks split across ranks, gathered on rank 0 — the same metrics as 1 process."""
    import shutil
    copies = []
    for name in ("one", "two"):
        d = tmp_path / name
        shutil.copytree(run_dir, d, ignore=shutil.ignore_patterns("eval"))
        copies.append(d)
    assert cli.main([str(copies[0]), "--step", "20", "logging.wandb_mode=disabled"]) == 0
    outs = run_eval_ranks([str(copies[1]), "--step", "20"])  # torchrun's variables, no launcher process
    one, two = (json.loads((d / "eval" / "20.json").read_text()) for d in copies)
    assert two["world_size"] == 2 and one["world_size"] == 1
    assert two["metrics"].keys() == one["metrics"].keys() and two["not_meaningful"].keys() == one["not_meaningful"].keys()
    for k, v in {**one["metrics"], **one["not_meaningful"]}.items():
        assert {**two["metrics"], **two["not_meaningful"]}[k] == pytest.approx(v, rel=1e-6, abs=1e-9), k
    assert outs[0][0].count("[eval step 20]") == 1 and "[eval step 20]" not in outs[1][0]  # rank 0 writes


def test_more_ranks_than_batches_is_refused(run_dir):
    from vqd_scale.eval.job import EvalJob, Ranks
    cfg = load_config(run_dir / "config.yaml")  # 6 samples in batches of 4: two batches
    with pytest.raises(ValueError, match="2 batches for 4 ranks"):
        EvalJob(cfg, run_dir, Ranks(rank=0, world=4))
