"""The Corgi chain end to end on tiny sizes: synthetic shards → vqd-extract (tiny CLIP, --keep-uncaptioned) →
vqd-train the decoder (real DeepSpeed, a few steps) → vqd-sample text → prior → decoder → PNG and image
variations → vqd-eval of the decoder alone and of the chain. The prior is a complete run directory written by
hand from a freshly built (untrained) prior with a mixture fitted on the shards: the chain's plumbing is under
test here, the prior's training has its own test (test_prior_e2e.py)."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image
from safetensors.torch import save_file

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))
import fit_prior_clusters  # noqa: E402

RES, STEPS, BATCH = 16, 6, 8


def _env() -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore::FutureWarning",
               WANDB_MODE="disabled", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0",
               MASTER_ADDR="127.0.0.1", PYTHONPATH=str(REPO))
    for k in ("SLURM_PROCID", "SLURM_NTASKS"):
        env.pop(k, None)
    return env


def _drop_captions(shard: Path, every: int) -> None:
    """Every `every`-th image of an img2dataset shard loses its caption (an image-only download)."""
    recs = list(wds.WebDataset(str(shard), shardshuffle=False))
    with wds.TarWriter(str(shard)) as sink:
        for i, r in enumerate(recs):
            r = {k: v for k, v in r.items() if k == "__key__" or not k.startswith("__")}
            if i % every == 0:
                del r["txt"]
            sink.write(r)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Token shards with tiny-CLIP embeddings (00000-00001 train, a quarter image-only; 00002 held out), the
    tokenizer, a decoder trained for STEPS steps, and a hand-written prior run."""
    from vqd_scale.config import save_config
    from vqd_scale.data.embed import ClipEmbedder
    from vqd_scale.data.extract import ExtractConfig, run_extract
    from vqd_scale.data.synthetic import SyntheticSpec, synthetic_images, write_shards
    from vqd_scale.families import build_task, load_config
    from vqd_scale.models.vqvae import KMeansTokenizer

    root = tmp_path_factory.mktemp("corgi")
    KMeansTokenizer.fit(synthetic_images(40, RES), patch=4, num_codes=16, seed=0, name="km").save(root / "tok")
    write_shards(root / "raw", SyntheticSpec(samples_per_shard=16, resolution=RES, seed=0), shard_ids=[0, 1, 2])
    for s in (0, 1):
        _drop_captions(root / "raw" / f"{s:05d}.tar", every=4)
    data = root / "data"
    clip = ClipEmbedder.build("tiny", None, "cpu", str(data))
    m = run_extract(ExtractConfig(inputs=str(root / "raw/{00000..00002}.tar"), out_dir=str(data),
                                  tokenizer=str(root / "tok"), resolution=RES, source="syn", batch_size=16,
                                  progress=False, min_size=0, keep_uncaptioned=True), clip)
    assert m["totals"] == {"written": 48, "uncaptioned": 8} and m["embed_dim"] == 32
    # the decoder: real vqd-train, language-free, on captioned and image-only records alike, standardising the
    # embeddings by the training data's mean / std (a one-component fit)
    run = root / "decoder"
    shards = f"{data}/{{00000..00001}}.tar"
    stats = root / "embed_stats.safetensors"
    fit_prior_clusters.main(["--shards", shards, "--manifest", str(data / "manifest.json"), "--k", "1",
                             "--out", str(stats)])
    r = subprocess.run([sys.executable, "-m", "vqd_scale.cli.train", str(REPO / "configs" / "tiny_decoder.yaml"),
                        f"run_dir={run}", f'data.sources=[{{name: syn, shards: "{shards}"}}]',
                        f"data.manifest={data}/manifest.json", "model.height=4", "model.width=4",
                        f"data.batch_size={BATCH}", f"max_samples={STEPS * BATCH}", "checkpoint.every_steps=3",
                        "logging.every_steps=1", "logging.wandb_mode=disabled", f"decoder.embed_stats={stats}",
                        "--resume", "auto"],
                       capture_output=True, text=True, timeout=600, cwd=REPO, env=_env())
    assert r.returncode == 0, r.stderr[-4000:]
    # the prior: a complete run directory around an untrained prior whose mixture is fitted on the shards
    clusters = root / "clusters.safetensors"
    fit_prior_clusters.main(["--shards", shards, "--manifest", str(data / "manifest.json"), "--k", "2",
                             "--out", str(clusters)])
    prior = root / "prior"
    pcfg = load_config(REPO / "configs" / "tiny_prior.yaml", [
        f"run_dir={prior}", f'data.sources=[{{name: syn, shards: "{shards}"}}]', f"data.manifest={data}/manifest.json",
        f"shifted.clusters={clusters}", "prior.num_components=2", "shifted.sample_steps=4"])
    torch.manual_seed(0)
    task = build_task(pcfg, torch.device("cpu"))
    ckpt = prior / "checkpoints" / "step_00000001"
    ckpt.mkdir(parents=True)
    save_config(pcfg, prior / "config.yaml")
    save_file({k: v.contiguous() for k, v in task.text.state_dict().items()}, str(prior / "text_encoder.safetensors"))
    save_file({k: v.contiguous() for k, v in task.module.state_dict().items()}, str(ckpt / "ema.safetensors"))
    (ckpt / "complete.json").write_text(json.dumps({"step": 1, "samples_seen": 1, "world_size": 1,
                                                    "model": task.model_config}))
    return {"root": root, "data": data, "tok": root / "tok", "decoder": run, "prior": prior}


def test_decoder_trains_on_image_only_records(world):
    from vqd_scale.rundir import list_complete, read_metrics

    run = world["decoder"]
    assert [s for s, _ in list_complete(run)] == [3, STEPS]
    m = read_metrics(run)
    assert max(m) == STEPS and {"loss", "vlb", "drop_image_frac", "captioned_frac"} <= set(m[STEPS])
    frac = np.mean([m[s]["captioned_frac"] for s in m])
    assert 0.55 < frac < 0.95, frac  # a quarter of the training records are image-only, and they are used
    assert not (run / "text_encoder.safetensors").exists()  # language-free: no text tower at all
    from vqd_scale.data.clusters import load_clusters
    from vqd_scale.rundir import load_weights
    ema = load_weights(run / "checkpoints" / f"step_{STEPS:08d}", "ema")
    fitted = load_clusters(world["root"] / "embed_stats.safetensors")
    assert torch.allclose(ema["embed_mean"], fitted["means"][0].float())  # the stats travel in the weights
    assert torch.allclose(ema["embed_std"], fitted["stds"][0].float() * 32 ** 0.5)


def test_sample_chain_and_variations_write_images(world, tmp_path, capsys):
    from vqd_scale.cli.sample import main
    from vqd_scale.config import SamplerConfig
    from vqd_scale.data.embed import ClipEmbedder
    from vqd_scale.data.schema import read_manifest
    from vqd_scale.families import load_sampler
    from vqd_scale.models.vqvae import ImageTokenizer

    base = ["--image-tokenizer", str(world["tok"]), "--steps", "4", "--guidance", "2", "--truncation", "0.9",
            "--seed", "3", "--device", "cpu"]
    prompts = ["a red circle at the top left", "a blue square in the center"]
    chain = ["--prior", str(world["prior"]), "--decoder", str(world["decoder"]),
             *[x for p in prompts for x in ("--prompt", p)]]
    assert main(chain + base + ["--out", str(tmp_path / "chain")]) == 0
    got = [np.asarray(Image.open(tmp_path / "chain" / f"{i:05d}.png")) for i in range(2)]
    assert got[0].shape == (RES, RES, 3) and (tmp_path / "chain" / "grid.png").is_file()
    # the same chain by hand: the prompts' CLIP text embeddings → the prior's samples → the decoder's tokens
    _, prior = load_sampler(world["prior"])
    _, dec = load_sampler(world["decoder"])
    clip = ClipEmbedder.from_manifest(read_manifest(world["data"] / "manifest.json"), "cpu")
    gen = torch.Generator().manual_seed(3)
    emb = prior.embeddings_from_text(prior.text.tokenize(prompts), clip.embed_texts(prompts), gen)
    ids = dec.tokens_from_embeddings(emb, None, SamplerConfig(steps=4, guidance_scale=2, truncation_rate=0.9), gen)
    want = ImageTokenizer.load(world["tok"]).decode(ids.view(-1, 4, 4))
    want = ((want.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    assert all(np.abs(a.astype(int) - b.astype(int)).max() <= 1 for a, b in zip(got, want))
    # image variations: a held-out image → its CLIP embedding → the decoder, --variations samples each
    img = Image.fromarray(got[0]).resize((32, 32))
    img.save(tmp_path / "in.png")
    assert main(["--decoder", str(world["decoder"]), "--image", str(tmp_path / "in.png"), "--variations", "3",
                 *base, "--out", str(tmp_path / "var")]) == 0
    assert sorted(p.name for p in (tmp_path / "var").glob("0*.png")) == ["00000.png", "00001.png", "00002.png"]
    # refusals through the registry, one line each (exit 2)
    capsys.readouterr()
    ckpt = world["decoder"] / "checkpoints" / f"step_{STEPS:08d}"
    assert main(["--checkpoint", str(ckpt), "--prompt", "x", *base]) == 2
    assert "task='decoder' does not turn text into an image" in capsys.readouterr().err
    assert main(["--prior", str(world["decoder"]), "--decoder", str(world["decoder"]), "--prompt", "x", *base]) == 2
    assert "not text→embedding" in capsys.readouterr().err
    assert main(["--decoder", str(world["prior"]), "--image", str(tmp_path / "in.png"), *base]) == 2
    assert "not embedding→tokens" in capsys.readouterr().err


def test_eval_job_scores_the_decoder_and_the_chain(world):
    from vqd_scale.cli.eval import main as vqd_eval

    run = world["decoder"]
    held = f"{world['data']}/00002.tar"
    args = [str(run), "--once", "--step", str(STEPS), f"eval.shards={held}", f"eval.tokenizer={world['tok']}",
            "eval.clip_model=tiny", "eval.metrics=[fid,clip_score,attributes]", "eval.num_samples=8",
            "eval.sampler.steps=4", "eval.sampler.batch_size=4", "eval.grid_size=4", f"eval.prior_run={world['prior']}",
            "logging.wandb_mode=disabled"]
    assert vqd_eval(args) in (0, None)
    res = json.loads((run / "eval" / f"{STEPS}.json").read_text())
    assert res["task"] == "decoder" and res["num_samples"] == 8 and (run / "eval" / f"{STEPS}.png").is_file()
    m = res["metrics"]
    for k in ("attr_all", "attr_color", "chain_attr_all", "chain_attr_color"):
        assert 0.0 <= m[k] <= 1.0, (k, m)
    assert -1.0 <= m["chain_prior_cos_image"] <= 1.0
    # FID / CLIP score of the random tiny CLIP tower are kept apart, for the chain too
    assert {"fid", "clip_score", "chain_fid", "chain_clip_score"} <= set(res["not_meaningful"])
    assert res["sampler"]["chain_prior"]["run"] == str(world["prior"])
    assert vqd_eval(args) in (0, None) and len(list((run / "eval").glob("*.json"))) == 1  # once per checkpoint
