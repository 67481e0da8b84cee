"""Frozen open_clip text tower: offline tokenization, shapes, normalisation, frozen, local weights only."""
import pytest
import torch

from vqd_scale.config import TextEncoderConfig
from vqd_scale.models.text import FrozenCLIPTextEncoder, build_clip


@pytest.fixture(scope="module")
def enc():
    torch.manual_seed(0)
    return FrozenCLIPTextEncoder(TextEncoderConfig(model="tiny"))


def test_tokenize_offline_bpe(enc):
    tok = enc.tokenize(["a photo of a cat", "a dog"])
    assert tok.shape == (2, 77) and tok.dtype == torch.long
    # CLIP BPE: <start_of_text>=49406, <end_of_text>=49407, 'a</w>'=320, 'photo</w>'=1125, zero padding.
    assert tok[0, :4].tolist() == [49406, 320, 1125, 539]
    assert tok[1, :4].tolist() == [49406, 320, 1929, 49407] and tok[1, 4:].eq(0).all()


def test_features_shapes_normalised_and_text_dependent(enc):
    tok = enc.tokenize(["a red square", "a blue circle"])
    feats, emb = enc(tok), enc.embed(tok)
    assert feats.shape == (2, 77, 64) and emb.shape == (2, 32)
    assert torch.allclose(feats.norm(dim=-1), torch.ones(2, 77), atol=1e-5)
    assert torch.allclose(emb.norm(dim=-1), torch.ones(2), atol=1e-5)
    assert (feats[0] - feats[1]).abs().max() > 1e-3 and (emb[0] - emb[1]).abs().max() > 1e-3
    # Causal text transformer: the shared "<sot> a" prefix gives identical features.
    assert torch.allclose(feats[0, :2], feats[1, :2], atol=1e-5)


def test_frozen(enc):
    assert not any(p.requires_grad for p in enc.parameters())
    enc.train()
    assert not enc.training and not enc.clip.training
    out = enc(enc.tokenize(["x"]))
    assert not out.requires_grad


def test_local_weights_load_and_hub_tags_refused(enc, tmp_path):
    torch.manual_seed(1)
    cfg = TextEncoderConfig(model="tiny")
    source = build_clip(cfg)  # a full open_clip CLIP with other random weights, saved as a local file
    path = tmp_path / "clip.pt"
    torch.save(source.state_dict(), path)
    loaded = FrozenCLIPTextEncoder(TextEncoderConfig(model="tiny", pretrained=str(path)))
    assert torch.equal(loaded.clip.token_embedding.weight, source.token_embedding.weight)
    assert not torch.equal(loaded.clip.token_embedding.weight, enc.clip.token_embedding.weight)
    with pytest.raises(FileNotFoundError, match="hub tags are refused"):
        FrozenCLIPTextEncoder(TextEncoderConfig(model="tiny", pretrained="laion2b_s34b_b79k"))
    with pytest.raises(ValueError, match="not an open_clip model"):
        FrozenCLIPTextEncoder(TextEncoderConfig(model="no-such-model"))
    with pytest.raises(ValueError, match="tokens must be"):
        enc(torch.zeros(1, 10, dtype=torch.long))
