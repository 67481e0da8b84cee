"""tools/prepare_tokenizer.py: a pretrained VQ model (diffusers VQModel dir, or a taming VQGAN checkpoint
converted to one) → pruned tokenizer fitted on the user's shards, with a report; checked against
diffusers' own quantiser and taming-transformers' own modules."""
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from vqd_scale.cli.extract import main as extract_main
from vqd_scale.compat import import_open_clip
from vqd_scale.data.synthetic import SyntheticSpec, write_shards
from vqd_scale.data.tokenizer_prep import shard_images
from vqd_scale.models.vqvae import ImageTokenizer

import_open_clip()  # diffusers imports torchvision; compat makes that work on CPU torch
from diffusers import VQModel  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RES, N_IMAGES = 16, 24
HELD, FIT = [0, 10], [i for i in range(24) if i not in (0, 10)]  # --heldout 2: every tenth image, two at most


def _tool():
    spec = importlib.util.spec_from_file_location("prepare_tokenizer", REPO / "tools" / "prepare_tokenizer.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.main


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    d = tmp_path_factory.mktemp("photos")
    write_shards(d, SyntheticSpec(num_shards=2, samples_per_shard=N_IMAGES // 2, resolution=32, seed=4))
    return str(d / "{00000..00001}.tar")


def test_prepare_from_a_vqmodel_dir(tmp_path, shards):
    torch.manual_seed(0)
    model = VQModel(block_out_channels=(32, 32), down_block_types=("DownEncoderBlock2D",) * 2,
                    up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, latent_channels=4,
                    num_vq_embeddings=256, norm_num_groups=8, sample_size=RES).eval()
    model.save_pretrained(str(tmp_path / "vq"))
    out = tmp_path / "tok"
    assert _tool()(["--vqmodel", str(tmp_path / "vq"), "--shards", shards, "--resolution", str(RES), "--out",
                    str(out), "--heldout", "2", "--batch-size", "5"]) == 0
    tok = ImageTokenizer.load(out)
    report = json.loads((out / "prepare_report.json").read_text())
    # oracle: diffusers' own quantiser on the images that are not held out
    x = torch.from_numpy(np.stack(list(shard_images(shards, RES)))).permute(0, 3, 1, 2).float() / 127.5 - 1
    assert len(x) == N_IMAGES
    with torch.no_grad():
        _, _, (_, _, ids) = model.quantize(model.encode(x[FIT]).latents)
        full_held = model.quantize(model.encode(x[HELD]).latents)[2][2]
        recon_full = model.decode(model.encode(x[HELD]).latents).sample.clamp(-1, 1)
    used = ids.unique()
    assert torch.equal(tok.keep, used) and 1 < tok.num_classes == used.numel() < 256
    assert report["codes_kept"] == used.numel() and report["codes_total"] == 256
    assert report["fit_images"] == len(FIT) and report["heldout_images"] == len(HELD)
    assert report["fit_tokens"] == len(FIT) * (RES // 2) ** 2
    assert report["recon_mse_full"] == pytest.approx(float(((recon_full - x[HELD]) ** 2).mean()), rel=1e-5)
    assert report["heldout_tokens_pruned"] == pytest.approx(float((~torch.isin(full_held, used)).float().mean()))
    pruned = tok.decode(tok.encode(x[HELD]))
    assert report["recon_mse_pruned"] == pytest.approx(float(((pruned - x[HELD]) ** 2).mean()), rel=1e-5)
    assert tok.resolution == RES and report["tokenizer_id"] == tok.tokenizer_id
    # vqd-extract takes the prepared tokenizer's resolution: no --resolution needed; ids are compact
    assert extract_main(["--inputs", shards, "--out-dir", str(tmp_path / "tokens"), "--tokenizer", str(out),
                         "--no-progress"]) == 0
    m = json.loads((tmp_path / "tokens" / "manifest.json").read_text())
    assert (m["resolution"], m["token_shape"], m["num_classes"]) == (RES, [8, 8], tok.num_classes)


def _taming_parts(dd, n_embed, embed_dim):
    from taming.modules.diffusionmodules.model import Decoder, Encoder
    from taming.modules.vqvae.quantize import VectorQuantizer2

    torch.manual_seed(1)
    parts = {"encoder": Encoder(**dd), "decoder": Decoder(**dd), "quantize": VectorQuantizer2(n_embed, embed_dim, 0.25),
             "quant_conv": torch.nn.Conv2d(dd["z_channels"], embed_dim, 1),
             "post_quant_conv": torch.nn.Conv2d(embed_dim, dd["z_channels"], 1)}
    for name in ("encoder", "decoder"):  # non-trivial norms, so a swapped norm name shows in the outputs
        for pname, p in parts[name].named_parameters():
            if "norm" in pname:
                p.data.normal_(1.0 if pname.endswith("weight") else 0.0, 0.3)
    return parts


def test_taming_vqgan_converts_exactly_and_prepares(tmp_path, shards):
    dd = dict(double_z=False, z_channels=8, resolution=RES, in_channels=3, out_ch=3, ch=32, ch_mult=[1, 2, 2],
              num_res_blocks=1, attn_resolutions=[8, 4], dropout=0.0)
    parts = _taming_parts(dd, 48, 6)
    sd = {f"{n}.{k}": v for n, m in parts.items() for k, v in m.state_dict().items()}
    sd["loss.discriminator.main.0.weight"] = torch.zeros(4)  # Lightning checkpoints carry the GAN loss too
    torch.save({"state_dict": sd, "global_step": 7}, tmp_path / "last.ckpt")
    cfg = {"model": {"target": "taming.models.vqgan.VQModel", "params": {"embed_dim": 6, "n_embed": 48, "ddconfig": dd}}}
    (tmp_path / "model.yaml").write_text(yaml.safe_dump(cfg))
    from vqd_scale.interop.taming import vqmodel_from_taming
    from vqd_scale.models.vqvae import VQModelTokenizer

    vq = VQModelTokenizer(vqmodel_from_taming(tmp_path / "last.ckpt", tmp_path / "model.yaml"))
    x = torch.rand(3, 3, RES, RES, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():  # taming's own forward: encode → nearest code → decode
        h = parts["quant_conv"](parts["encoder"](x))
        zq, _, (_, _, ref_ids) = parts["quantize"](h)
        ref_img = parts["decoder"](parts["post_quant_conv"](zq))
    ids = vq.encode(x)
    assert torch.equal(ids.flatten(), ref_ids.flatten())
    torch.testing.assert_close(vq.decode(ids), ref_img.clamp(-1, 1), atol=1e-4, rtol=1e-4)
    # the tool does the same conversion, then fits the map
    out = tmp_path / "tok"
    assert _tool()(["--taming-ckpt", str(tmp_path / "last.ckpt"), "--taming-config", str(tmp_path / "model.yaml"),
                    "--shards", shards, "--resolution", str(RES), "--out", str(out), "--heldout", "2"]) == 0
    tok = ImageTokenizer.load(out)
    assert tok.token_shape(RES) == (4, 4) and 1 < tok.num_classes <= 48 and tok.kind == "vqmodel"


def test_taming_refusals(tmp_path, capsys):
    from vqd_scale.interop.taming import load_taming_state_dict

    torch.save({"state_dict": {"quantize.proj.weight": torch.zeros(2), "quantize.embed.weight": torch.zeros(2)}},
               tmp_path / "gumbel.ckpt")
    with pytest.raises(ValueError, match="Gumbel"):
        load_taming_state_dict(tmp_path / "gumbel.ckpt")
    torch.save({"state_dict": {"x": torch.zeros(1)}, "cb": _Opaque()}, tmp_path / "pickled.ckpt")
    with pytest.raises(ValueError, match="--trust-pickle"):
        load_taming_state_dict(tmp_path / "pickled.ckpt")
    (tmp_path / "bad.yaml").write_text("model: {params: {embed_dim: 3}}\n")
    assert _tool()(["--taming-ckpt", str(tmp_path / "pickled.ckpt"), "--taming-config", str(tmp_path / "bad.yaml"),
                    "--shards", "x.tar", "--resolution", "16", "--out", str(tmp_path / "o")]) == 2
    assert "not a taming VQGAN config" in capsys.readouterr().err


class _Opaque:
    """Not a tensor or a plain container: torch.load(weights_only=True) refuses to unpickle it."""
