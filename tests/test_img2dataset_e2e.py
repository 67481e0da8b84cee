"""The real-photo path with the real tool: `img2dataset` downloads images served on 127.0.0.1 by this test
into webdataset shards → tools/prepare_tokenizer.py (tiny random VQModel) → vqd-extract → a few vqd-train
steps (K from the manifest beside the shards) → vqd-eval --once; plus header-boundary cuts of a real shard."""
import csv
import functools
import http.server
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from test_data_inputs import header_offsets
from vqd_scale.cli.extract import main as extract_main
from vqd_scale.data.inputs import TRUNCATED, iter_raw_samples

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
PHOTOS = {f"p{i}.jpg": (64 + 23 * i, 48 + 17 * (i % 4)) for i in range(10)}  # name → (w, h), all ≥ 48 px
CAPTIONS = {name: f"  Photo {i}: a café at dusk —\tnumber {i}  " for i, name in enumerate(PHOTOS)}


def _photo(size, seed):
    """A smooth colour image (gradients + a blob), not noise: what a VQGAN codebook is made for."""
    w, h = size
    y, x = np.mgrid[0:h, 0:w] / max(w, h)
    rng = np.random.default_rng(seed)
    c = rng.uniform(0, 1, (3, 3))
    img = np.stack([c[k, 0] * x + c[k, 1] * y + c[k, 2] * np.exp(-((x - .5) ** 2 + (y - .4) ** 2) * 20)
                    for k in range(3)], -1)
    return Image.fromarray((255 * img / img.max()).astype(np.uint8))


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def downloaded(tmp_path_factory):
    """img2dataset output (two webdataset shards + stats) of 10 photos, a 1×1 pixel, a broken file and a 404."""
    root = tmp_path_factory.mktemp("web")
    www = root / "www"
    www.mkdir()
    for i, (name, size) in enumerate(PHOTOS.items()):
        _photo(size, i).save(www / name, quality=90)
    Image.new("RGB", (1, 1), (255, 255, 255)).save(www / "pixel.png")
    (www / "broken.jpg").write_bytes(b"\xff\xd8 this is not a jpeg")
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(www)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    with open(root / "urls.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["url", "caption"])
        for name in PHOTOS:
            w.writerow([f"{base}/{name}", CAPTIONS[name]])
        w.writerows([[f"{base}/pixel.png", "tracking pixel"], [f"{base}/broken.jpg", "broken"],
                     [f"{base}/missing.jpg", "gone"]])
    out = root / "laion"
    # no proxy for the local server; albumentations (imported by img2dataset) must not look for updates online
    env = dict(os.environ, OMP_NUM_THREADS="1", NO_PROXY="127.0.0.1", no_proxy="127.0.0.1", NO_ALBUMENTATIONS_UPDATE="1")
    try:
        r = subprocess.run([shutil.which("img2dataset") or "img2dataset", f"--url_list={root / 'urls.csv'}",
                            "--input_format=csv", "--url_col=url", "--caption_col=caption", f"--output_folder={out}",
                            "--output_format=webdataset", "--image_size=32", "--resize_mode=center_crop",
                            "--processes_count=1", "--thread_count=4", "--number_sample_per_shard=7",
                            "--timeout=10", "--retries=0", "--enable_wandb=False"],
                           capture_output=True, text=True, timeout=300, env=env)
    finally:
        server.shutdown()
    assert r.returncode == 0, r.stderr[-3000:]
    stats = [json.loads(p.read_text()) for p in sorted(out.glob("*_stats.json"))]
    assert sum(s["successes"] for s in stats) == 11 and sum(s["count"] for s in stats) == 13  # photos + pixel
    return out, base


def _prepare_tool():
    spec = importlib.util.spec_from_file_location("prepare_tokenizer", REPO / "tools" / "prepare_tokenizer.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.main


def test_img2dataset_to_training_and_eval(downloaded, tmp_path):
    shards_dir, base = downloaded
    shards = str(shards_dir / "{00000..00001}.tar")
    # 1. tokenizer: a pretrained VQModel directory (tiny and random here) → pruning map fitted on these shards
    from vqd_scale.compat import import_diffusers
    import torch
    torch.manual_seed(0)
    vq = import_diffusers().VQModel(block_out_channels=(32, 32, 32), down_block_types=("DownEncoderBlock2D",) * 3,
                                    up_block_types=("UpDecoderBlock2D",) * 3, layers_per_block=1, latent_channels=4,
                                    num_vq_embeddings=128, norm_num_groups=8)
    vq.save_pretrained(str(tmp_path / "vq"))
    tok = tmp_path / "tok"
    assert _prepare_tool()(["--vqmodel", str(tmp_path / "vq"), "--shards", shards, "--resolution", "32",
                            "--out", str(tok), "--heldout", "2"]) == 0
    # 2. extraction: every successful download is one record, except the pixel (too small); nothing else lost
    out = tmp_path / "tokens"
    assert extract_main(["--inputs", shards, "--out-dir", str(out), "--tokenizer", str(tok), "--no-progress",
                         "--fail-on-invalid-shard"]) == 0
    m = json.loads((out / "manifest.json").read_text())
    assert m["totals"] == {"written": 10, "skipped_too_small": 1} and m["truncated_shards"] == []
    assert (m["source"], m["resolution"], m["token_shape"]) == ("laion", 32, [8, 8])
    recs = [r for p in sorted(out.glob("0000*.tar")) for r in wds.WebDataset(str(p), shardshuffle=False)]
    assert len(recs) == 10
    for r in recs:
        meta = json.loads(r["json"])
        name = meta["url"][len(base) + 1:]
        assert meta["original_size"] == list(PHOTOS[name])  # as served, not img2dataset's 32 px
        assert r["txt"].decode() == CAPTIONS[name]  # exactly as in the URL list
    # 3. a few training steps: K and grid from the manifest beside the shards (no data.manifest)
    run = tmp_path / "run"
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", WANDB_MODE="disabled",
               PYTHONWARNINGS="ignore::FutureWarning")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS"):
        env.pop(k, None)
    r = subprocess.run([sys.executable, "-m", "vqd_scale.cli.train", str(REPO / "configs" / "tiny.yaml"),
                        f"run_dir={run}", f'data.sources=[{{name: laion, shards: "{out}/{{00000..00001}}.tar"}}]',
                        "data.batch_size=4", "max_samples=8", "checkpoint.every_steps=2", "logging.every_steps=1",
                        "logging.wandb_mode=disabled"], capture_output=True, text=True, timeout=600, cwd=REPO, env=env)
    assert r.returncode == 0, r.stderr[-4000:]
    assert (run / "checkpoints" / "step_00000002" / "complete.json").exists()
    # 4. vqd-eval --once: real captions → no attribute numbers; random tiny CLIP → FID / CLIP score labelled
    from vqd_scale.cli import eval as eval_cli
    assert eval_cli.main([str(run), "--once", f"eval.shards={out}/00000.tar", f"eval.tokenizer={tok}",
                          "eval.clip_model=tiny", "eval.num_samples=4", "eval.sampler.steps=2",
                          "eval.sampler.batch_size=4", "eval.metrics=[fid,clip_score,attributes]", "eval.grid_size=4",
                          "logging.wandb_mode=disabled"]) == 0
    res = json.loads((run / "eval" / "2.json").read_text())
    assert res["metrics"] == {} and set(res["not_meaningful"]) == {"fid", "clip_score"}
    assert set(res["metric_notes"]) == {"fid", "clip_score", "attributes"} and (run / "eval" / "2.png").exists()


def test_header_boundary_cuts_of_a_real_shard(downloaded, tmp_path):
    """Every cut of a real img2dataset shard at a member header is truncated_tar, with the lost count."""
    shards_dir, _ = downloaded
    whole = (shards_dir / "00000.tar").read_bytes()
    stats = (shards_dir / "00000_stats.json").read_text()
    n = json.loads(stats)["successes"]
    heads, end = header_offsets(whole)
    assert len(heads) >= 3 * n  # img2dataset writes jpg, json, txt per sample (each with a PAX header)
    (tmp_path / "00000_stats.json").write_text(stats)
    path = tmp_path / "00000.tar"
    for cut in heads[1:] + [end]:
        path.write_bytes(whole[:cut])
        events = list(iter_raw_samples(str(path)))
        kept = [g for _, g, r in events if r is None]
        assert [r for *_, r in events if r is not None] == [TRUNCATED], cut
        assert all("txt" in g and "jpg" in g for g in kept)  # no cut sample passes as "missing_caption"
        assert events[-1][1]["_lost"] == n - len(kept)
    path.write_bytes(whole[:heads[len(heads) // 2]])
    args = ["--inputs", str(path), "--out-dir", str(tmp_path / "out"), "--tokenizer", str(_kmeans(tmp_path)),
            "--no-progress", "--source", "laion"]
    assert extract_main(args + ["--fail-on-invalid-shard"]) == 2
    m = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert m["truncated_shards"] == ["00000.tar"] and m["totals"]["lost_samples"] + m["totals"]["written"] == n


def _kmeans(tmp_path):
    from vqd_scale.data.synthetic import synthetic_images
    from vqd_scale.models.vqvae import KMeansTokenizer

    tok = KMeansTokenizer.fit(synthetic_images(40, 32), patch=8, num_codes=16, seed=0)
    tok.resolution = 32
    return tok.save(tmp_path / "km")
