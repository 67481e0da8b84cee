"""Image tokenizers: diffusers VQModel as the oracle for encode/decode, pruning map, ids, save/load, k-means demo quality."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vqd_scale.compat import import_open_clip
from vqd_scale.models.vqvae import ImageTokenizer, KMeansTokenizer, VQModelTokenizer

import_open_clip()  # diffusers imports torchvision; compat makes that work on CPU torch
from diffusers import VQModel  # noqa: E402


@pytest.fixture(scope="module")
def vq_dir(tmp_path_factory):
    torch.manual_seed(0)
    model = VQModel(block_out_channels=(32, 32), down_block_types=("DownEncoderBlock2D",) * 2,
                    up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, latent_channels=4,
                    num_vq_embeddings=64, norm_num_groups=8, sample_size=16)
    d = tmp_path_factory.mktemp("vq")
    model.save_pretrained(str(d))
    return d


def images(n=3, size=16, seed=0):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_vqmodel_matches_diffusers(vq_dir):
    tok = ImageTokenizer.load(vq_dir)  # a bare diffusers directory works (identity map)
    model = VQModel.from_pretrained(str(vq_dir)).eval()
    x = images()
    with torch.no_grad():
        lat = model.encode(x).latents
        _, _, (_, _, ref_ids) = model.quantize(lat)
        ref_img = model.decode(lat).sample  # diffusers quantises then decodes
    ids = tok.encode(x)
    assert ids.shape == (3, 8, 8) and tok.num_classes == 64
    assert torch.equal(ids.flatten(), ref_ids.flatten())
    torch.testing.assert_close(tok.decode(ids), ref_img.clamp(-1, 1), atol=1e-5, rtol=1e-5)


def test_pruning_map_encode_decode_and_id(vq_dir, tmp_path):
    tok = VQModelTokenizer.from_diffusers(vq_dir, name="tinyvq")
    x = images(4)
    full = tok.encode_full(x)
    seen = full[:2]  # fit on half the images: some codes of the other half get pruned
    tok.fit_pruning_map(seen)
    keep = seen.unique()
    assert tok.num_classes == keep.numel() < 64
    assert torch.equal(tok.keep, keep) and torch.equal(tok.full_to_compact[keep], torch.arange(keep.numel()))
    ids = tok.encode(x)
    assert int(ids.max()) < tok.num_classes
    # seen images: compact ids map back to exactly the full ids
    assert torch.equal(keep[ids[:2]], full[:2])
    # unseen images: nearest kept code (brute force in latent space)
    model = tok.model
    with torch.no_grad():
        z = model.encode(x[2:]).latents.permute(0, 2, 3, 1).reshape(-1, 4)
    d = torch.cdist(z, model.quantize.embedding.weight[keep])
    assert torch.equal(ids[2:].flatten(), d.argmin(1))
    # decode(compact) == diffusers decoder on the full ids
    with torch.no_grad():
        q = model.quantize.embedding(keep[ids]).permute(0, 3, 1, 2)
        ref = model.decode(q, force_not_quantize=True).sample
    torch.testing.assert_close(tok.decode(ids), ref.clamp(-1, 1))
    # id: stable through save/load, changes with the map
    tid = tok.tokenizer_id
    assert tid.startswith("vqmodel-")  # kind + hash: the name is a label, not part of the identity
    tok.save(tmp_path / "t")
    loaded = ImageTokenizer.load(tmp_path / "t")
    assert loaded.tokenizer_id == tid and torch.equal(loaded.encode(x), ids)
    assert tok.fit_pruning_map(full).tokenizer_id != tid
    with pytest.raises(ValueError, match=r"token ids must be in \[0, "):
        loaded.decode(torch.full((1, 8, 8), loaded.num_classes))


def test_tampered_or_wrong_directory_is_refused(vq_dir, tmp_path):
    tok = VQModelTokenizer.from_diffusers(vq_dir)
    tok.save(tmp_path / "t")
    meta = json.loads((tmp_path / "t" / "tokenizer.json").read_text())
    meta["tokenizer_id"] = "other-123"
    (tmp_path / "t" / "tokenizer.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="modified"):
        ImageTokenizer.load(tmp_path / "t")
    with pytest.raises(FileNotFoundError, match="not a tokenizer directory"):
        ImageTokenizer.load(tmp_path)
    meta["kind"] = "nope"
    (tmp_path / "t" / "tokenizer.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="unknown tokenizer kind"):
        ImageTokenizer.load(tmp_path / "t")
    with pytest.raises(ValueError, match="multiples of 2"):
        tok.encode(torch.zeros(1, 3, 15, 15))


def test_kmeans_tokenizer_is_recognisable(tmp_path):
    """Decoded synthetic images keep colour, shape and position (what the demo's eval measures)."""
    from vqd_scale.data.synthetic import SyntheticSpec, attribute_accuracy, make_sample, synthetic_images

    train = synthetic_images(300, 32, seed=0, two_object_prob=0.0)
    tok = KMeansTokenizer.fit(train, patch=4, num_codes=128, seed=0, name="km")
    assert tok.token_shape(32) == (8, 8)
    spec = SyntheticSpec(resolution=32, seed=5)
    samples = [make_sample(spec, 0, i) for i in range(40)]
    x = torch.stack([torch.from_numpy(np.array(im)).permute(2, 0, 1) for im, _, _ in samples])  # [N,3,R,R] uint8
    x = x.float() / 127.5 - 1
    recon = tok.decode(tok.encode(x))
    acc = attribute_accuracy([c for _, c, _ in samples], recon)
    assert acc["all"] >= 0.9, acc
    # a tokenizer that ignored its input would score near chance
    blank = tok.decode(tok.encode(torch.flip(x, dims=[0])))
    assert attribute_accuracy([c for _, c, _ in samples], blank)["all"] < 0.5
    # an all-background patch decodes flat (within 2 grey levels), not with a dot left by the rarer edge
    # patches that share its cluster
    bg = x[:, :, :1, :1]  # [N,3,1,1], the corner colour
    other = ((x - bg).abs().amax(1, keepdim=True) > 1e-6).float()  # [N,1,R,R] pixels that are not background
    flat = F.max_pool2d(other, 4) == 0  # [N,1,8,8] token patches with no such pixel
    err = F.max_pool2d((recon - bg).abs().amax(1, keepdim=True), 4)  # [N,1,8,8] worst pixel per patch
    assert flat.float().mean() > 0.5 and err[flat].max() < 2 / 127.5, err[flat].max()
    tok.save(tmp_path / "km")
    again = ImageTokenizer.load(tmp_path / "km")
    assert again.tokenizer_id == tok.tokenizer_id and torch.equal(again.encode(x), tok.encode(x))


def test_identity_comes_from_weights_and_map_not_names(vq_dir, tmp_path):
    """Copying or renaming a VQGAN directory keeps its id (extraction and eval compare ids); weights change it."""
    import shutil

    copy = tmp_path / "vqgan_copy"
    shutil.copytree(vq_dir, copy)
    bare = ImageTokenizer.load(vq_dir)
    assert ImageTokenizer.load(copy).tokenizer_id == bare.tokenizer_id
    assert VQModelTokenizer.from_diffusers(vq_dir, name="other label").tokenizer_id == bare.tokenizer_id
    bare.resolution = 16
    bare.save(tmp_path / "saved")
    shutil.copytree(tmp_path / "saved", tmp_path / "moved")
    moved = ImageTokenizer.load(tmp_path / "moved")
    assert moved.tokenizer_id == bare.tokenizer_id and moved.resolution == 16
    # what the id must still tell apart: another weight, another pruning map, another norm grouping
    model = VQModel.from_pretrained(str(vq_dir))
    with torch.no_grad():
        model.decoder.conv_out.bias += 1e-3
    assert VQModelTokenizer(model).tokenizer_id != bare.tokenizer_id
    assert VQModelTokenizer.from_diffusers(vq_dir).fit_pruning_map(torch.arange(10)).tokenizer_id != bare.tokenizer_id
    regrouped = VQModel.from_config({**VQModel.load_config(str(vq_dir)), "norm_num_groups": 16})
    regrouped.load_state_dict(VQModel.from_pretrained(str(vq_dir)).state_dict())  # same tensors, other GroupNorm
    assert not torch.equal(VQModelTokenizer(regrouped).encode(images()), bare.encode(images()))
    assert VQModelTokenizer(regrouped).tokenizer_id != bare.tokenizer_id
