"""The Corgi decoder's pieces on tiny real parts: conditioning paths, null embedding, perturbation, image-only
records through extraction and the loader, and the registry line."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import webdataset as wds

from vqd_scale.config import DataConfig, DecoderConfig, SourceConfig, TransformerConfig
from vqd_scale.data import schema
from vqd_scale.data.loader import TokenLoader
from vqd_scale.errors import UserError
from vqd_scale.models.decoder import ImageConditionedTransformer, perturb

K, E, DC, L = 16, 24, 32, 8


def model(with_text=False, **kw):
    torch.manual_seed(0)
    m = ImageConditionedTransformer(TransformerConfig(num_classes=K, height=4, width=4, context_dim=DC, context_len=L,
                                                      num_timesteps=10, layers=2, dim=32, heads=2),
                                    DecoderConfig(embed_dim=E, image_tokens=3, with_text=with_text, **kw))
    return m.eval()


def unit(*shape, seed=0):
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


def inputs(B=3):
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, K + 1, (B, 16), generator=g), torch.randint(0, 10, (B,), generator=g)


@torch.no_grad()
def test_forward_shape_and_both_condition_paths_change_the_output():
    m = model()
    x, t = inputs()
    a, b = m(x, t, image_emb=unit(3, E, seed=0)), m(x, t, image_emb=unit(3, E, seed=1))
    assert a.shape == (3, K, 16) and torch.allclose(a.exp().sum(1), torch.ones(3, 16), atol=1e-5)
    assert (a - b).abs().amax() > 1e-4  # another embedding, another prediction
    # each path alone carries the condition: cross-attention rows, and the AdaLN timestep addend
    for off in ("image_to_tokens", "image_to_time"):
        mm = model()
        getattr(mm, off).weight.zero_()
        getattr(mm, off).bias.zero_()
        a, b = mm(x, t, image_emb=unit(3, E, seed=0)), mm(x, t, image_emb=unit(3, E, seed=1))
        assert (a - b).abs().amax() > 1e-4, f"no condition left without {off}"
    both = model()
    for off in ("image_to_tokens", "image_to_time"):
        getattr(both, off).weight.zero_()
    a, b = both(x, t, image_emb=unit(3, E, seed=0)), both(x, t, image_emb=unit(3, E, seed=1))
    assert torch.equal(a, b)  # and nothing else reads the embedding


@torch.no_grad()
def test_dropped_rows_see_the_learned_null_embedding_and_null_text():
    m = model(with_text=True)
    x, t = inputs()
    ctx0, ctx1 = torch.randn(3, L, DC), torch.randn(3, L, DC)
    e0, e1 = unit(3, E, seed=0), unit(3, E, seed=1)
    drop = torch.tensor([True, False, True])
    a = m(x, t, image_emb=e0, context=ctx0, drop_image=drop)
    b = m(x, t, image_emb=e1, context=ctx0, drop_image=drop)
    assert torch.equal(a[drop], b[drop]) and (a[~drop] - b[~drop]).abs().amax() > 1e-4
    null = m(x, t, image_emb=m.null_image.expand(3, E), context=ctx0)
    assert torch.allclose(a[drop], null[drop], atol=1e-6)  # the null is the learned parameter
    # text dropped independently of the image: the rows follow the embedding, not the caption
    c = m(x, t, image_emb=e0, context=ctx0, drop_text=drop)
    d = m(x, t, image_emb=e0, context=ctx1, drop_text=drop)
    assert torch.equal(c[drop], d[drop]) and (c[~drop] - d[~drop]).abs().amax() > 1e-4
    assert torch.allclose(c[drop], m(x, t, image_emb=e0, context=None)[drop], atol=1e-6)  # = no caption at all
    # gradients reach the nulls (they are learned), and a model without text has no text null at all
    m.train()
    with torch.enable_grad():
        m(x, t, image_emb=e0, context=ctx0, drop_image=drop, drop_text=drop).sum().backward()
    assert m.null_image.grad.abs().sum() > 0 and m.null_context.grad.abs().sum() > 0
    assert "null_context" not in model(with_text=False).state_dict()


@torch.no_grad()
def test_embedding_stats_standardise_before_both_paths_and_travel_in_the_weights():
    x, t = inputs()
    common = unit(E, seed=9)  # embeddings sharing one direction (cos ≈ 0.99), as a random tiny CLIP's do
    e = F.normalize(common + 0.05 * unit(3, E, seed=3), dim=-1)
    mean, std = e.mean(0), e.std(0) + 1e-3
    m, plain = model(), model()
    m.load_embed_stats(mean, std)
    z = (e - mean) / (std * E ** 0.5)
    assert torch.allclose(m(x, t, image_emb=e), plain(x, t, image_emb=z), atol=1e-6)  # the same net on z
    assert torch.equal(plain.standardise(e), e)  # identity until stats are loaded
    again = model()
    again.load_state_dict(m.state_dict())  # strict: a checkpoint carries the stats
    assert torch.equal(again(x, t, image_emb=e), m(x, t, image_emb=e))
    assert not m.embed_mean.requires_grad and not m.embed_std.requires_grad


@pytest.mark.parametrize("alpha,cos", [(0.25, 0.970), (0.5, 0.894), (3.0, 0.316)])
def test_perturbation_keeps_unit_norm_at_the_angle_alpha_sets(alpha, cos):
    e = unit(4096, 512)
    p = perturb(e, alpha, torch.Generator().manual_seed(5))  # not e's seed: ε would be e itself
    assert torch.allclose(p.norm(dim=-1), torch.ones(4096), atol=1e-5)
    # ε/‖ε‖ is nearly orthogonal to e in 512 dims: cos(e', e) = 1/√(1+α²) (the spec's table)
    assert abs(F.cosine_similarity(p, e).mean().item() - cos) < 0.005
    assert torch.equal(perturb(e, 0.0), e)
    assert torch.equal(p, perturb(e, alpha, torch.Generator().manual_seed(5)))  # drawn from the step's generator


# ---- image-only data ---------------------------------------------------------------------------------------------

def write_shard(path, n, captioned, emb_dim=8, start=0):
    """Token shard of n records (captioned or image-only) + done-marker; returns manifest totals."""
    rng = np.random.default_rng(start)
    with schema.tar_writer(path) as sink:
        for i in range(n):
            cap = f"caption {start + i}" if captioned(i) else None
            sink.write(schema.encode_record(f"{start + i:06d}", rng.integers(0, K, (4, 4)), rng.integers(0, 999, 77),
                                            cap, {"tokenizer_id": "t"}, rng.standard_normal(emb_dim),
                                            rng.standard_normal(emb_dim)))
    bare = sum(not captioned(i) for i in range(n))
    schema.write_json_atomic(schema.done_marker_path(path), {
        "output": path.name, "written": n, "uncaptioned": bare, "tokenizer_id": "t", "num_classes": K,
        "token_shape": [4, 4]})
    schema.write_json_atomic(path.parent / schema.MANIFEST, {
        "format": schema.FORMAT, "tokenizer_id": "t", "num_classes": K, "token_shape": [4, 4], "context_length": 77,
        "embed_dim": emb_dim, "shards": [{"name": path.name, "count": n}],
        "totals": {"written": n, **({"uncaptioned": bare} if bare else {})}})


def loader(sources, captions, dropout=None, bs=10):
    cfg = DataConfig(sources=[SourceConfig(name, shards, w) for name, shards, w in sources], batch_size=bs,
                     num_workers=0, epoch_samples=10_000, with_embeddings=True, shuffle_buffer=0)
    return TokenLoader(cfg, dropout=dropout, captions=captions)


def test_loader_keeps_or_skips_uncaptioned_records_by_the_familys_needs(tmp_path):
    (tmp_path / "mix").mkdir()
    write_shard(tmp_path / "mix" / "00000.tar", 40, captioned=lambda i: i % 4 == 0)
    src = [("mix", str(tmp_path / "mix" / "00000.tar"), 1.0)]
    it = iter(loader(src, "optional", {"text": 0.0, "image": 0.3}))
    batches = [next(it) for _ in range(8)]
    cap = torch.cat([b["captioned"] for b in batches])
    assert 0.2 < cap.float().mean() < 0.3  # every record kept: a quarter captioned
    for b in batches:  # an uncaptioned image always trains with the null text, and has no caption or text tokens
        assert torch.equal(b["drop_text"], ~b["captioned"])
        assert all(c == "" for c, k in zip(b["caption"], b["captioned"]) if not k)
        assert (b["text_tokens"][~b["captioned"]] == 0).all() and (b["text_emb"][~b["captioned"]] == 0).all()
    img_drop = torch.cat([b["drop_image"] for b in batches]).float().mean()
    assert 0.15 < img_drop < 0.45  # drawn at decoder.drop_image, independently of the caption's
    req = loader(src, "required", {"text": 0.1})
    it = iter(req)
    b = next(it)
    assert all(int(k) % 4 == 0 for k in b["key"]) and "drop_image" not in b and "captioned" not in b
    assert req.skipped()["uncaptioned"] >= 1  # counted, never silent


def test_loader_mixes_captioned_and_image_only_sources_by_weight(tmp_path):
    for name, cap in (("cap", lambda i: True), ("bare", lambda i: False)):
        (tmp_path / name).mkdir()
        write_shard(tmp_path / name / "00000.tar", 50, captioned=cap, start=0 if name == "cap" else 1000)
    src = [("cap", str(tmp_path / "cap" / "00000.tar"), 0.1), ("bare", str(tmp_path / "bare" / "00000.tar"), 0.9)]
    it = iter(loader(src, "optional", {"text": 0.0, "image": 0.0}, bs=50))
    cap = torch.cat([next(it)["captioned"] for _ in range(8)]).float().mean()
    assert 0.06 < cap < 0.14, cap  # "10 % captioned"
    with pytest.raises(UserError, match="only image-only records"):
        loader(src, "required", {"text": 0.1})  # the prior (captions required) refuses an image-only source


def test_extract_keep_uncaptioned_counts_them_apart(tmp_path):
    from vqd_scale.data.extract import ExtractConfig, run_extract
    from vqd_scale.data.synthetic import SyntheticSpec, synthetic_images, write_shards
    from vqd_scale.models.vqvae import KMeansTokenizer

    KMeansTokenizer.fit(synthetic_images(30, 16), patch=8, num_codes=8, seed=0, name="km").save(tmp_path / "tok")
    write_shards(tmp_path / "src", SyntheticSpec(samples_per_shard=6, resolution=16, seed=3), shard_ids=[0])
    shard = tmp_path / "src" / "00000.tar"
    recs = list(wds.WebDataset(str(shard), shardshuffle=False))
    with wds.TarWriter(str(shard)) as sink:  # two images lose their captions (blank, and no txt member)
        for i, r in enumerate(recs):
            r = {k: v for k, v in r.items() if k != "__url__" and not k.startswith("__local")}
            if i == 1:
                r["txt"] = b"  "
            if i == 4:
                del r["txt"]
            sink.write(r)

    def extract(out, keep):
        return run_extract(ExtractConfig(inputs=str(shard), out_dir=str(tmp_path / out),
                                         tokenizer=str(tmp_path / "tok"), resolution=16, source="syn", batch_size=4,
                                         progress=False, min_size=0, keep_uncaptioned=keep))
    m = extract("skip", False)
    assert m["totals"] == {"written": 4, "skipped_missing_caption": 2}
    m = extract("keep", True)
    assert m["totals"] == {"written": 6, "uncaptioned": 2} and m["shards"][0]["uncaptioned"] == 2
    marker = json.loads((tmp_path / "keep" / "00000.done.json").read_text())
    assert (marker["written"], marker["uncaptioned"]) == (6, 2)
    out = {r["__key__"]: r for r in wds.WebDataset(str(tmp_path / "keep" / "00000.tar"), shardshuffle=False)}
    bare = [k for k, r in out.items() if "txt.tok.npy" not in r]
    assert len(bare) == 2
    assert all("txt" not in out[k] and json.loads(out[k]["json"])["captioned"] is False for k in bare)


def test_registry_line_and_config_checks():
    from vqd_scale import families
    from vqd_scale.errors import ConfigError

    fam = families.get("decoder")
    assert fam.needs.embeddings and fam.needs.captions == "optional" and fam.sampler is not None
    cfg = families.load_config(None, ["task=decoder", "decoder.drop_image=0.2", "decoder.drop_text=0.3"])
    assert fam.dropout(cfg) == {"text": 0.3, "image": 0.2}
    for bad in ("decoder.drop_image=1.0", "decoder.perturb_alpha=-1", "decoder.guidance_drops=text"):
        with pytest.raises(ConfigError, match=bad.split("=")[0]):
            families.load_config(None, ["task=decoder", bad])
    assert families.get("prior").needs.captions == "required" and families.get("vqd").needs.captions == "required"
