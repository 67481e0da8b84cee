"""Export to a diffusers VQDiffusionPipeline directory and back, at tiny size, fully offline."""
import numpy as np
import pytest
import torch

from vqd_scale.config import DiscreteDiffusionConfig, TextEncoderConfig, TransformerConfig
from vqd_scale.diffusion.discrete import MaskAndReplace
from vqd_scale.interop.pipeline import export_pipeline, import_pipeline_dir, _diffusers
from vqd_scale.models.text import FrozenCLIPTextEncoder
from vqd_scale.models.transformer import VQDiffusionTransformer
from vqd_scale.models.vqvae import ImageTokenizer, VQModelTokenizer

K, T, GRID = 12, 10, 4


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    diffusers, _ = _diffusers()
    torch.manual_seed(0)
    vq = diffusers.VQModel(block_out_channels=(16, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                           up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, num_vq_embeddings=20,
                           vq_embed_dim=4, norm_num_groups=8, sample_size=8)
    keep = torch.randperm(20)[:K].sort().values  # a pruning map: compact id i = full code keep[i]
    tok_dir = VQModelTokenizer(vq, name="tiny-vq", keep=keep).save(tmp_path_factory.mktemp("tok"))
    image_tok = ImageTokenizer.load(tok_dir)
    text = FrozenCLIPTextEncoder(TextEncoderConfig(model="tiny"))
    mcfg = TransformerConfig(num_classes=K, height=GRID, width=GRID, context_dim=64, num_timesteps=T, dim=32, heads=2)
    model = VQDiffusionTransformer(mcfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    dcfg = DiscreteDiffusionConfig(num_timesteps=T, preset="paper")
    out = export_pipeline(tmp_path_factory.mktemp("pipe"), model.state_dict(), mcfg, dcfg, text, image_tok)
    pipe = diffusers.VQDiffusionPipeline.from_pretrained(str(out))  # offline: HF_HUB_OFFLINE=1 (conftest)
    return dict(pipe=pipe, model=model, text=text, image_tok=image_tok, dcfg=dcfg, out=out)


def test_transformer_and_scheduler_posterior_match(exported):
    pipe, model = exported["pipe"], exported["model"]
    x = torch.randint(0, K + 1, (2, GRID * GRID))
    ctx = torch.randn(2, 77, 64)
    ours_diffusion = MaskAndReplace(exported["dcfg"], K)
    with torch.no_grad():
        for t in (0, 6):
            ours = model(x, torch.full((2,), t), ctx)
            theirs = pipe.transformer(x, encoder_hidden_states=ctx, timestep=torch.tensor(t)).sample
            assert (ours - theirs).abs().max() <= 1e-4
            post_ours = ours_diffusion.q_posterior(ours, x, torch.full((2,), t))
            post_theirs = pipe.scheduler.q_posterior(theirs, x, torch.tensor(t))
            assert torch.allclose(post_ours.exp(), post_theirs.exp().float(), atol=1e-4)
    assert torch.equal(pipe.learned_classifier_free_sampling_embeddings.embeddings, model.null_context)


def test_text_features_and_token_ids_match(exported):
    pipe, text = exported["pipe"], exported["text"]
    prompts = ["a photo of a cat", "Two DOGS, playing in the snow.", "café crème brûlée", ""]
    ids = pipe.tokenizer(prompts, padding="max_length", max_length=77, return_tensors="pt").input_ids
    assert torch.equal(ids, text.tokenize(prompts))
    with torch.no_grad():
        theirs = pipe._encode_prompt(prompts, 1, False)
    assert torch.allclose(theirs, text(text.tokenize(prompts)), atol=1e-5)


def test_pruned_vqvae_decodes_like_our_tokenizer(exported):
    pipe, image_tok = exported["pipe"], exported["image_tok"]
    ids = torch.randint(0, K, (2, GRID, GRID))
    with torch.no_grad():
        emb = pipe.vqvae.quantize.get_codebook_entry(ids.flatten(1), shape=(2, GRID, GRID, 4))
        theirs = pipe.vqvae.decode(emb, force_not_quantize=True).sample.clamp(-1, 1)
    assert torch.allclose(theirs, image_tok.decode(ids), atol=1e-5)


def test_pipeline_runs_end_to_end(exported):
    pipe = exported["pipe"]
    images = pipe(["a cat"], num_inference_steps=3, guidance_scale=3.0, output_type="np",
                  generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (1, 8, 8, 3) and np.isfinite(images).all()
    assert images.min() >= 0 and images.max() <= 1


def test_import_back_is_identity(exported):
    cfg, sd = import_pipeline_dir(exported["out"])
    ref = exported["model"].state_dict()
    assert set(sd) == set(ref) and all(torch.equal(sd[k], v) for k, v in ref.items())
    assert (cfg.num_classes, cfg.height, cfg.context_dim, cfg.num_timesteps) == (K, GRID, 64, T)


def _save_text_tower(exported, run_dir):
    """What training writes next to config.yaml when text.pretrained is unset."""
    from safetensors.torch import save_file
    from vqd_scale.rundir import TEXT_FILE
    save_file({k: v.contiguous() for k, v in exported["text"].state_dict().items()}, str(run_dir / TEXT_FILE))
    return run_dir / TEXT_FILE


def test_cli_round_trip(exported, tmp_path, capsys):
    """vqd-export import (diffusers dir) → weights + yaml; to-diffusers from those → same transformer."""
    from omegaconf import OmegaConf
    from safetensors.torch import load_file
    from vqd_scale.cli.export import main
    from vqd_scale.config import save_config
    from vqd_scale.families import RunConfig
    w = tmp_path / "w.safetensors"
    assert main(["import", str(exported["out"]), "--out", str(w)]) == 0
    sd = load_file(str(w))
    assert torch.equal(sd["out.weight"], exported["model"].state_dict()["out.weight"])
    run = RunConfig()
    run.model = TransformerConfig(**OmegaConf.to_container(OmegaConf.load(w.with_suffix(".yaml")))["model"])
    run.text, run.diffusion = exported["text"].cfg, exported["dcfg"]
    run.eval.sampler.steps = T
    save_config(run, tmp_path / "config.yaml")
    tok_dir = exported["image_tok"].save(tmp_path / "tok")
    out = tmp_path / "pipe2"
    args = ["to-diffusers", "--weights", str(w), "--config", str(tmp_path / "config.yaml"),
            "--image-tokenizer", str(tok_dir), "--out", str(out)]
    assert main(args) == 2  # the run's random-init text tower is not next to its config: refused, not redrawn
    assert "text.pretrained is unset" in capsys.readouterr().err
    _save_text_tower(exported, tmp_path)
    assert main(args) == 0
    for part in ("transformer", "text_encoder"):  # the trained weights and the run's own text tower
        a = load_file(str(next((out / part).glob("*.safetensors"))))
        b = load_file(str(next((exported["out"] / part).glob("*.safetensors"))))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), part
    assert main(["to-diffusers", "--weights", str(w), "--image-tokenizer", str(tok_dir), "--out", str(out)]) != 0


def test_sample_cli_writes_pngs(exported, tmp_path):
    from PIL import Image
    from safetensors.torch import save_file
    from vqd_scale.cli.sample import main
    from vqd_scale.config import save_config
    from vqd_scale.families import RunConfig
    run = RunConfig()
    run.model, run.text, run.diffusion = exported["model"].cfg, exported["text"].cfg, exported["dcfg"]
    run.eval.sampler.steps = T
    save_config(run, tmp_path / "config.yaml")
    save_file(exported["model"].state_dict(), str(tmp_path / "w.safetensors"))
    tok_dir = exported["image_tok"].save(tmp_path / "tok")
    _save_text_tower(exported, tmp_path)
    args = ["--weights", str(tmp_path / "w.safetensors"), "--config", str(tmp_path / "config.yaml"),
            "--image-tokenizer", str(tok_dir), "--prompt", "a cat", "--prompt", "a dog", "--steps", "3",
            "--guidance", "2", "--batch", "1", "--out", str(tmp_path / "s"), "--device", "cpu"]
    assert main(args) == 0
    assert Image.open(tmp_path / "s" / "00001.png").size == (8, 8)
    assert Image.open(tmp_path / "s" / "grid.png").size == (2 * (8 + 2) + 2, 8 + 2 + 2)  # 2 tiles, 2 px gutters
    # same seed: the same images (which also needs the run's text tower, not a freshly drawn one)
    assert main(args[:-4] + ["--out", str(tmp_path / "again"), "--device", "cpu"]) == 0
    pixels = lambda d: [np.asarray(Image.open(tmp_path / d / f"{i:05d}.png")) for i in range(2)]
    assert all(np.array_equal(x, y) for x, y in zip(pixels("s"), pixels("again")))
    assert main(args[:6] + ["--out", str(tmp_path / "s2")]) == 2  # no prompts: clear error, exit 2
