"""Streaming token loader: batch contract, exact resume, equal batch counts, mixing, bad data, clear errors."""
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds

from vqd_scale.config import DataConfig, SourceConfig
from vqd_scale.data import schema
from vqd_scale.data.loader import TokenLoader
from vqd_scale.data.random_shards import write_random_token_shards

K, SHAPE = 50, (4, 4)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    write_random_token_shards(d / "a", 6, 40, SHAPE, K, embed_dim=8, seed=1, prefix="a")
    write_random_token_shards(d / "b", 3, 40, SHAPE, K, embed_dim=8, seed=2, prefix="b")
    return d


def cfg_for(d, **kw):
    base = dict(sources=[SourceConfig("a", str(d / "a" / "a{00000..00005}.tar"), 1.0)], batch_size=4,
                num_workers=0, epoch_samples=64, shuffle_buffer=16, seed=3)
    base.update(kw)
    return DataConfig(**base)


def take(loader, n):
    it = iter(loader)
    return [next(it) for _ in range(n)]


def same(a, b):
    return a["key"] == b["key"] and all(torch.equal(a[k], b[k]) for k in ("image_tokens", "text_tokens", "drop_text"))


def test_batch_contract(shards):
    b = take(TokenLoader(cfg_for(shards, with_embeddings=True), dropout={"text": 0.5}), 1)[0]
    assert b["image_tokens"].dtype == torch.int64 and b["image_tokens"].shape == (4, *SHAPE)
    assert b["text_tokens"].dtype == torch.int64 and b["text_tokens"].shape == (4, 77)
    assert b["drop_text"].dtype == torch.bool and b["drop_text"].shape == (4,)
    assert b["image_emb"].dtype == torch.float32 and b["image_emb"].shape == (4, 8)
    assert len(b["caption"]) == len(b["key"]) == 4 and all(c == f"caption {k}" for c, k in zip(b["caption"], b["key"]))
    # tokens decoded by the loader equal the bytes in the tar (independent np.load path)
    raw = {s["__key__"]: s for s in wds.WebDataset(str(shards / "a" / "a{00000..00005}.tar"), shardshuffle=False)}
    for i, k in enumerate(b["key"]):
        np.testing.assert_array_equal(b["image_tokens"][i].numpy(), np.load(__import__("io").BytesIO(raw[k]["img.tok.npy"])))


@pytest.mark.timeout(120)
def test_resume_two_ranks_two_workers_is_exact(shards):
    """torchtitan-style: 50 batches, save, rebuild, the next 100 equal an uninterrupted run (per rank)."""
    cfg = cfg_for(shards, num_workers=2, sources=[SourceConfig("a", str(shards / "a" / "a{00000..00005}.tar"), 2.0),
                                                  SourceConfig("b", str(shards / "b" / "b{00000..00002}.tar"), 1.0)])
    for rank in range(2):
        full = take(TokenLoader(cfg, rank, 2, dropout={"text": 0.3}), 150)
        first = TokenLoader(cfg, rank, 2, dropout={"text": 0.3})
        it = iter(first)
        head = [next(it) for _ in range(51)]  # 51: resume from a position that is not a multiple of the workers
        state = json.loads(json.dumps(first.state_dict()))  # must survive serialisation
        resumed = TokenLoader(cfg, rank, 2, dropout={"text": 0.3})
        resumed.load_state_dict(state)
        tail = take(resumed, 99)
        assert all(same(a, b) for a, b in zip(head, full[:51]))
        assert all(same(a, b) for a, b in zip(tail, full[51:])), f"rank {rank}: resumed stream diverged"
        assert first.batches_per_epoch == 8 and full[0]["key"] != full[8]["key"]  # crosses epoch boundaries


def test_equal_batches_and_disjoint_ranks_without_resampling(shards):
    cfg = cfg_for(shards, resampled=False, shuffle_buffer=0, epoch_samples=120)
    keys = []
    for rank in range(3):
        loader = TokenLoader(cfg, rank, 3)
        assert loader.batches_per_epoch == 10
        batches = take(loader, loader.batches_per_epoch)
        keys.append({k for b in batches for k in b["key"]})
        assert loader.epoch == 1
    assert not (keys[0] & keys[1]) and not (keys[1] & keys[2]) and not (keys[0] & keys[2])
    with pytest.raises(ValueError, match="resampled"):
        TokenLoader(cfg, 0, 7)  # 6 shards cannot give 7 ranks one each
    with pytest.raises(ValueError, match="resampled"):
        TokenLoader(cfg_for(shards, resampled=False, num_workers=2), 0, 4)  # nor 4 ranks × 2 workers


def test_mixing_weights(shards):
    cfg = cfg_for(shards, sources=[SourceConfig("a", str(shards / "a" / "a{00000..00005}.tar"), 3.0),
                                   SourceConfig("b", str(shards / "b" / "b{00000..00002}.tar"), 1.0)],
                  batch_size=50, epoch_samples=100000)
    keys = [k for b in take(TokenLoader(cfg), 40) for k in b["key"]]
    frac_a = sum(k.startswith("a") for k in keys) / len(keys)
    assert abs(frac_a - 0.75) < 0.04, frac_a


def test_caption_dropout_rate_and_seed(shards):
    drops = torch.cat([b["drop_text"] for b in take(TokenLoader(cfg_for(shards, batch_size=50), dropout={"text": 0.2}), 20)])
    assert abs(drops.float().mean().item() - 0.2) < 0.05
    none = torch.cat([b["drop_text"] for b in take(TokenLoader(cfg_for(shards)), 5)])
    assert not none.any()
    other = take(TokenLoader(cfg_for(shards, seed=4)), 2)
    assert [b["key"] for b in other] != [b["key"] for b in take(TokenLoader(cfg_for(shards)), 2)]


def test_tokenizer_id_mismatch_is_refused(shards):
    with pytest.raises(ValueError, match="data.tokenizer_id"):
        TokenLoader(cfg_for(shards, tokenizer_id="vqgan-abc"))
    assert TokenLoader(cfg_for(shards, tokenizer_id="random-000000000000")).num_classes == K


def test_missing_and_empty_sources_give_clear_errors(tmp_path, shards):
    with pytest.raises(FileNotFoundError, match="data.sources"):
        TokenLoader(cfg_for(tmp_path, sources=[SourceConfig("x", str(tmp_path / "{0..3}.tar"))]))
    with pytest.raises(ValueError, match="empty"):
        TokenLoader(cfg_for(tmp_path, sources=[SourceConfig("x", "")]))
    # gaps in numbering are skipped with a warning, not fatal
    gap = cfg_for(shards, sources=[SourceConfig("a", str(shards / "a" / "a{00000..00009}.tar"))])
    assert len(TokenLoader(gap).spec.sources[0].shards) == 6
    with pytest.raises(FileNotFoundError, match="vqd-extract"):  # no manifest next to the shards
        d = tmp_path / "nomanifest"
        write_random_token_shards(d, 1, 4, SHAPE, K)
        (d / schema.MANIFEST).unlink()
        TokenLoader(cfg_for(d, sources=[SourceConfig("x", str(d / "00000.tar"))]))


def _write_bad_shard(path: Path, good: int):
    """A token shard with `good` valid records followed by corrupt ones of every kind."""
    rng = np.random.default_rng(0)
    with wds.TarWriter(str(path), encoder=False) as sink:
        for i in range(good):
            sink.write(schema.encode_record(f"g{i:04d}", rng.integers(0, K, SHAPE), rng.integers(0, 100, 77), "ok", {}))
        bad = schema.encode_record("x1", np.full(SHAPE, K + 5), np.zeros(77), "out of range", {})
        sink.write(bad)
        sink.write({**schema.encode_record("x2", np.zeros((3, 3)), np.zeros(77), "bad shape", {})})
        sink.write({"__key__": "x3", schema.IMAGE_TOKENS: b"garbage", schema.TEXT_TOKENS: b"\x93NUMPY junk"})
        sink.write({"__key__": "x4", schema.CAPTION: b"no tokens"})


def test_corrupt_samples_are_skipped_and_counted(tmp_path):
    d = tmp_path / "bad"
    write_random_token_shards(d, 1, 4, SHAPE, K)
    _write_bad_shard(d / "00000.tar", good=20)
    (d / "00000.done.json").unlink()  # count unknown: the loader scans the tar
    m = json.loads((d / schema.MANIFEST).read_text())
    m["shards"] = []
    (d / schema.MANIFEST).write_text(json.dumps(m))
    loader = TokenLoader(cfg_for(d, sources=[SourceConfig("x", str(d / "00000.tar"))], batch_size=5, shuffle_buffer=0))
    batches = take(loader, 8)
    assert all(k.startswith("g") for b in batches for k in b["key"])
    skipped = loader.skipped()
    assert skipped["token_out_of_range"] >= 1 and skipped["bad_image_tokens"] >= 1 and skipped["missing_member"] >= 1
    assert any(k.startswith("undecodable") for k in skipped)


@pytest.mark.timeout(60)
def test_everything_filtered_out_raises_instead_of_hanging(tmp_path):
    d = tmp_path / "allbad"
    write_random_token_shards(d, 2, 8, (8, 8), K)  # manifest says 4×4 tokens below → every record is invalid
    m = json.loads((d / schema.MANIFEST).read_text())
    m["token_shape"] = [4, 4]
    (d / schema.MANIFEST).write_text(json.dumps(m))
    for marker in d.glob("*.done.json"):  # with them the wrong token_shape is refused up front (test below)
        marker.unlink()
    for workers in (0, 1):
        loader = TokenLoader(cfg_for(d, sources=[SourceConfig("x", str(d / "{00000..00001}.tar"))],
                                     num_workers=workers), max_consecutive_failures=50)
        with pytest.raises(RuntimeError, match="filtered out"):
            take(loader, 1)


@pytest.mark.timeout(60)
def test_unreadable_shards_raise_instead_of_hanging(tmp_path):
    d = tmp_path / "unreadable"
    write_random_token_shards(d, 2, 8, SHAPE, K)
    for p in d.glob("*.tar"):
        p.write_bytes(b"")  # zero-byte shards, markers still claim 8 samples
    loader = TokenLoader(cfg_for(d, sources=[SourceConfig("x", str(d / "{00000..00001}.tar"))]))
    with pytest.raises(RuntimeError, match="zero-byte"):  # the message carries the last read error
        take(loader, 1)


def test_state_mismatch_is_refused(shards):
    a = TokenLoader(cfg_for(shards), 0, 2)
    take(a, 3)
    with pytest.raises(ValueError, match="num_workers"):
        TokenLoader(cfg_for(shards, num_workers=2), 0, 2).load_state_dict(a.state_dict())
    with pytest.raises(ValueError, match="rank"):
        TokenLoader(cfg_for(shards), 1, 2).load_state_dict(a.state_dict())
    counts = Counter(k for b in take(a, 16) for k in b["key"])
    assert max(counts.values()) <= 2  # within a 64-sample epoch a key is not drawn many times


def test_fast_tar_reader_matches_tarfile(tmp_path, shards):
    """The header-parsing fast path returns exactly what tarfile returns; PAX tars fall back; cut tails raise."""
    import tarfile

    from vqd_scale.data.shards import _members, _ustar_members, read_shard

    path = shards / "a" / "a00000.tar"
    with tarfile.open(path) as tf:
        ref = [(m.name, tf.extractfile(m).read()) for m in tf if m.isfile()]
    assert _ustar_members(path.read_bytes())[1] is None and list(_members(str(path))) == ref
    pax = tmp_path / "pax.tar"
    with wds.TarWriter(str(pax)) as w:  # float mtimes → PAX headers
        w.write({"__key__": "k" * 120, "txt": b"long key"})
    assert _ustar_members(pax.read_bytes()) is None
    assert list(_members(str(pax))) == [("k" * 120 + ".txt", b"long key")]
    cut = tmp_path / "cut.tar"
    for n in (5000, 6 * 1024 * 5 + 100):  # inside a header, inside a member's data
        cut.write_bytes(path.read_bytes()[:n])
        with pytest.raises(tarfile.ReadError):
            list(_members(str(cut)))
        errors = {}
        got = list(read_shard(str(cut), errors))
        assert errors["shard_read_error"] == 1
        # samples before the cut survive; the one being read when it fails is dropped (it may miss members)
        assert len(got) == max(n // (6 * 1024) - 1, 0) and all(len(g) == 7 for g in got)  # 6 × 1 KiB + key


def test_data_manifest_does_not_override_another_sources_counts(tmp_path):
    """laion_vqd_b.yaml: data.manifest is laion's; cc15m's 00000.tar must keep its own count and identity."""
    write_random_token_shards(tmp_path / "a", 2, 8, SHAPE, K, seed=1)
    write_random_token_shards(tmp_path / "b", 2, 3, SHAPE, K, seed=2)
    srcs = [SourceConfig("a", str(tmp_path / "a" / "{00000..00001}.tar"), 1.0),
            SourceConfig("b", str(tmp_path / "b" / "{00000..00001}.tar"), 1.0)]
    loader = TokenLoader(cfg_for(tmp_path, sources=srcs, manifest=str(tmp_path / "a" / "manifest.json")))
    assert [s.counts for s in loader.spec.sources] == [[8, 8], [3, 3]]
    write_random_token_shards(tmp_path / "c", 2, 3, SHAPE, K, seed=3, tokenizer_id="other-000000000000")
    srcs[1] = SourceConfig("c", str(tmp_path / "c" / "{00000..00001}.tar"), 1.0)
    with pytest.raises(ValueError, match="tokenizer_id=other"):  # was accepted: c's manifest was never read
        TokenLoader(cfg_for(tmp_path, sources=srcs, manifest=str(tmp_path / "a" / "manifest.json")))
    with pytest.raises(ValueError, match="point data.manifest"):
        TokenLoader(cfg_for(tmp_path, sources=srcs[1:], manifest=str(tmp_path / "a" / "manifest.json")))


@pytest.mark.parametrize("workers", [0, 2])
def test_unresampled_epochs_shorter_than_a_shard_still_cover_the_data(shards, workers):
    """Virtual epochs of 8 samples over 40-sample shards: one pass reads every sample once (the stream
    continues across epochs; it used to restart at a fresh shard head each epoch, never reaching the tails)."""
    cfg = cfg_for(shards, resampled=False, epoch_samples=8, num_workers=workers)
    loader = TokenLoader(cfg)
    assert loader.batches_per_epoch == 2  # 8 samples in batches of 4 (one per worker with 2)
    batches = take(loader, 6 * 40 // 4)  # exactly one pass over the 6 shards
    counts = Counter(k for b in batches for k in b["key"])
    assert len(counts) == 240 and set(counts.values()) == {1}
    assert loader.epoch == 60 // loader.batches_per_epoch  # many epochs went by


def test_seek_is_where_an_uninterrupted_loader_of_that_world_size_is(shards):
    """Resume on another world size: seek(global samples) = the state of a loader that delivered them."""
    cfg = cfg_for(shards, num_workers=2, sources=[SourceConfig("a", str(shards / "a" / "a{00000..00005}.tar"), 2.0),
                                                  SourceConfig("b", str(shards / "b" / "b{00000..00002}.tar"), 1.0)])
    for delivered in (0, 7, 19):  # in the first epoch, mid-epoch later, odd counts over the two workers
        ref = TokenLoader(cfg, 1, 2)
        it = iter(ref)
        for _ in range(delivered):
            next(it)
        following = [next(it) for _ in range(3)]
        moved = TokenLoader(cfg, 1, 2)
        moved.seek(delivered * 2 * cfg.batch_size)  # samples over both ranks
        got = take(moved, 3)
        assert all(same(a, b) for a, b in zip(got, following)), delivered


def test_manifest_of_another_tokenizer_beside_the_shards_is_refused(tmp_path):
    write_random_token_shards(tmp_path, 3, 4, SHAPE, K, tokenizer_id="vqgan-aaaaaaaaaaaa")
    m = json.loads((tmp_path / schema.MANIFEST).read_text())
    (tmp_path / schema.MANIFEST).write_text(json.dumps({**m, "tokenizer_id": "vqgan-bbbbbbbbbbbb"}))
    with pytest.raises(ValueError, match=r"tokenizer_id='vqgan-aaaaaaaaaaaa' \(its done-marker 00000.done.json\)"):
        TokenLoader(cfg_for(tmp_path, sources=[SourceConfig("x", str(tmp_path / "{00000..00002}.tar"))]))
    (tmp_path / schema.MANIFEST).write_text(json.dumps({**m, "num_classes": K + 1}))
    with pytest.raises(ValueError, match="num_classes"):
        TokenLoader(cfg_for(tmp_path, sources=[SourceConfig("x", str(tmp_path / "{00000..00002}.tar"))]))
