"""Pre-extraction: token records checked against independent paths, done-markers/rerun, every kind of bad input."""
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from vqd_scale.cli.extract import main as extract_main
from vqd_scale.compat import import_open_clip
from vqd_scale.config import DataConfig, SourceConfig
from vqd_scale.data.extract import ExtractConfig, run_extract
from vqd_scale.data.loader import TokenLoader
from vqd_scale.data.synthetic import SyntheticSpec, synthetic_images, write_shards
from vqd_scale.models.vqvae import ImageTokenizer, KMeansTokenizer

R = 32


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    KMeansTokenizer.fit(synthetic_images(60, R), patch=8, num_codes=24, seed=0, name="km").save(d)
    return d


def cfg(inputs, out, tok_dir, **kw):
    return ExtractConfig(inputs=str(inputs), out_dir=str(out), tokenizer=str(tok_dir), resolution=R,
                         batch_size=5, progress=False, **kw)


def read_out(path):
    return {s["__key__"]: s for s in wds.WebDataset(str(path), shardshuffle=False)}


def test_extract_records_manifest_and_loader(tmp_path, tok_dir):
    src = tmp_path / "src"
    write_shards(src, SyntheticSpec(samples_per_shard=7, resolution=R, seed=3), shard_ids=[0, 2])  # gap: no 00001
    m = run_extract(cfg(src / "{00000..00002}.tar", tmp_path / "out", tok_dir, source="laion"))
    tok = ImageTokenizer.load(tok_dir)
    assert m["totals"] == {"written": 14} and m["complete"] and m["missing_inputs"] == [str(src / "00001.tar")]
    assert (m["tokenizer_id"], m["num_classes"], m["token_shape"]) == (tok.tokenizer_id, tok.num_classes, [4, 4])
    assert [s["name"] for s in m["shards"]] == ["00000.tar", "00002.tar"]
    clip_tok = import_open_clip().get_tokenizer("ViT-B-32")
    raw = {s["__key__"]: s for s in wds.WebDataset(str(src / "00002.tar"), shardshuffle=False)}
    out = read_out(tmp_path / "out" / "00002.tar")
    assert set(out) == set(raw)
    for key, rec in out.items():
        img = np.asarray(Image.open(io.BytesIO(raw[key]["jpg"])).convert("RGB"))  # already R×R: no resize
        x = torch.from_numpy(img.copy()).permute(2, 0, 1)[None].float() / 127.5 - 1
        ids = np.load(io.BytesIO(rec["img.tok.npy"]))
        assert ids.dtype == np.int16 and ids.shape == (4, 4)
        np.testing.assert_array_equal(ids, tok.encode(x)[0].numpy())
        txt = np.load(io.BytesIO(rec["txt.tok.npy"]))
        assert txt.dtype == np.int32 and txt.shape == (77,)
        np.testing.assert_array_equal(txt, clip_tok([raw[key]["txt"].decode()])[0].numpy())
        meta = json.loads(rec["json"])
        assert meta["source"] == "laion" and meta["original_size"] == [R, R] and meta["tokenizer_id"] == tok.tokenizer_id
    # worker-parallel decoding writes the same records
    run_extract(cfg(src / "{00000..00002}.tar", tmp_path / "out2", tok_dir, num_workers=2))
    out2 = read_out(tmp_path / "out2" / "00002.tar")
    assert all(out2[k]["img.tok.npy"] == out[k]["img.tok.npy"] for k in out)
    # the training loader accepts it, and refuses another tokenizer id
    dc = DataConfig(sources=[SourceConfig("laion", str(tmp_path / "out" / "{00000..00002}.tar"))], batch_size=7,
                    num_workers=0, tokenizer_id=tok.tokenizer_id)
    batch = next(iter(TokenLoader(dc)))
    assert batch["image_tokens"].shape == (7, 4, 4) and int(batch["image_tokens"].max()) < tok.num_classes
    dc.tokenizer_id = "vqgan-0123"
    with pytest.raises(ValueError, match="re-extract"):
        TokenLoader(dc)


def test_rerun_skips_done_shards_and_redoes_half_written(tmp_path, tok_dir):
    src, out = tmp_path / "src", tmp_path / "out"
    write_shards(src, SyntheticSpec(num_shards=2, samples_per_shard=4, resolution=R))
    c = cfg(src / "{00000..00001}.tar", out, tok_dir)
    run_extract(c)
    done0 = (out / "00000.done.json").stat().st_mtime_ns
    (out / "00001.done.json").unlink()  # killed after the rename, before the marker
    (out / "00001.tar").write_bytes(b"half")
    (out / "00001.tar.tmp999").write_bytes(b"stale")
    m = run_extract(c)
    assert (out / "00000.done.json").stat().st_mtime_ns == done0
    assert len(read_out(out / "00001.tar")) == 4 and not list(out.glob("*.tmp*"))
    assert m["totals"] == {"written": 8}
    # SLURM-array split: task 1 of 2 only writes shard 1
    out3 = tmp_path / "out3"
    m = run_extract(cfg(src / "{00000..00001}.tar", out3, tok_dir, task_index=1, num_tasks=2))
    assert not (out3 / "00000.tar").exists() and (out3 / "00001.done.json").exists()
    assert not m["complete"] and m["pending_inputs"] == ["00000.tar"]


def _img_bytes(mode, size, fmt):
    color = {"L": 128, "RGBA": (255, 0, 0, 128), "CMYK": (0, 255, 255, 0), "RGB": (0, 0, 255)}.get(mode, 3)
    img = Image.new(mode, size, color)
    if mode == "P":
        img.info["transparency"] = 0
    buf = io.BytesIO()
    img.save(buf, format=fmt, **({"transparency": 0} if mode == "P" else {}))
    return buf.getvalue()


def _add(tf, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def write_bad_shard(path):
    """Every kind of bad input img2dataset shards contain, plus images that need conversion."""
    good = _img_bytes("RGB", (R, R), "JPEG")
    with tarfile.open(path, "w") as tf:
        for i in range(3):
            _add(tf, f"good{i}.jpg", good)
            _add(tf, f"good{i}.txt", b"a blue square")
        for key, data in [("gray", _img_bytes("L", (40, 40), "PNG")), ("rgba", _img_bytes("RGBA", (R, R), "PNG")),
                          ("cmyk", _img_bytes("CMYK", (50, 50), "JPEG")), ("pal", _img_bytes("P", (R, R), "PNG")),
                          ("odd", _img_bytes("RGB", (37, 91), "JPEG"))]:
            _add(tf, f"{key}.jpg", data)
            _add(tf, f"{key}.txt", f"a {key} image".encode())
        _add(tf, "zero.jpg", b"")
        _add(tf, "zero.txt", b"zero bytes")
        _add(tf, "junk.jpg", b"\xff\xd8 not really a jpeg")
        _add(tf, "junk.txt", b"garbage")
        _add(tf, "nocap.jpg", good)
        _add(tf, "emptycap.jpg", good)
        _add(tf, "emptycap.txt", b"   ")
        _add(tf, "noimg.txt", b"caption without image")
        _add(tf, "good0.jpg", good)  # the same key again, later in the shard
        _add(tf, "good0.txt", b"duplicate")


def test_bad_inputs_are_skipped_and_counted(tmp_path, tok_dir):
    src, out = tmp_path / "src", tmp_path / "out"
    src.mkdir()
    write_bad_shard(src / "00000.tar")
    whole = (src / "00000.tar").read_bytes()
    (src / "00001.tar").write_bytes(whole[: len(whole) // 2 + 100])  # truncated mid-member
    (src / "00002.tar").write_bytes(b"")  # zero-byte shard
    with tarfile.open(src / "00003.tar", "w") as tf:  # every sample invalid
        for i in range(3):
            _add(tf, f"z{i}.jpg", b"")
            _add(tf, f"z{i}.txt", b"x")
    args = ["--inputs", str(src / "{00000..00003}.tar"), "--out-dir", str(out), "--tokenizer", str(tok_dir),
            "--resolution", str(R), "--no-progress"]
    assert extract_main(args + ["--fail-on-invalid-shard"]) == 2
    d0 = json.loads((out / "00000.done.json").read_text())
    assert d0["written"] == 8 and d0["skipped"] == {"duplicate_key": 1, "empty_image": 1, "missing_caption": 2,
                                                     "missing_image": 1, "undecodable_image": 1}
    recs = read_out(out / "00000.tar")
    assert sorted(recs) == sorted(["good0", "good1", "good2", "gray", "rgba", "cmyk", "pal", "odd"])
    assert json.loads(recs["odd"]["json"])["original_size"] == [37, 91]
    assert recs["good0"]["txt"] == b"a blue square"  # the first occurrence wins
    d1 = json.loads((out / "00001.done.json").read_text())
    assert d1["skipped"].get("truncated_tar") == 1 and 0 < d1["written"] < 8
    d2 = json.loads((out / "00002.done.json").read_text())
    assert d2["skipped"] == {"unreadable_shard": 1} and d2["all_invalid"]
    m = json.loads((out / "manifest.json").read_text())
    assert m["num_failed_shards"] == 2 and set(m["failed_shards"]) == {"00002.tar", "00003.tar"}
    assert m["totals"]["skipped_empty_image"] == 4
    assert extract_main(args) == 0  # rerun: nothing redone, failure still reported, status only with the flag


def test_clip_embeddings_match_the_text_encoder(tmp_path, tok_dir):
    """--clip-model tiny stores fp16 normalised embeddings; the saved random tower reproduces them in models/text.py."""
    from vqd_scale.config import TextEncoderConfig
    from vqd_scale.models.text import FrozenCLIPTextEncoder

    src, out = tmp_path / "src", tmp_path / "out"
    write_shards(src, SyntheticSpec(num_shards=1, samples_per_shard=4, resolution=R))
    assert extract_main(["--inputs", str(src / "00000.tar"), "--out-dir", str(out), "--tokenizer", str(tok_dir),
                         "--resolution", str(R), "--clip-model", "tiny", "--no-progress"]) == 0
    m = json.loads((out / "manifest.json").read_text())
    assert m["embed_dim"] == 32 and m["embedding_model"]["model"] == "tiny"
    recs = read_out(out / "00000.tar")
    enc = FrozenCLIPTextEncoder(TextEncoderConfig(model="tiny", pretrained=m["embedding_model"]["pretrained"]))
    for rec in recs.values():
        img_emb, txt_emb = (np.load(io.BytesIO(rec[k])) for k in ("img.emb.npy", "txt.emb.npy"))
        assert img_emb.dtype == np.float16 and img_emb.shape == (32,)
        assert abs(float(np.linalg.norm(img_emb.astype(np.float32))) - 1) < 1e-2
        ref = enc.embed(enc.tokenize([rec["txt"].decode()]))[0].numpy()
        np.testing.assert_allclose(txt_emb.astype(np.float32), ref, atol=2e-3)


def test_glob_inputs_are_expanded_and_no_match_is_refused(tmp_path, tok_dir):
    src = tmp_path / "src"
    write_shards(src, SyntheticSpec(samples_per_shard=3, resolution=R, seed=1), shard_ids=[0, 1])
    m = run_extract(cfg(src / "*.tar", tmp_path / "out", tok_dir))
    assert [s["name"] for s in m["shards"]] == ["00000.tar", "00001.tar"] and m["totals"] == {"written": 6}
    with pytest.raises(ValueError, match="check --inputs"):
        run_extract(cfg(tmp_path / "nope" / "{00000..00003}.tar", tmp_path / "out2", tok_dir))
    with pytest.raises(ValueError, match="no input shards"):
        run_extract(cfg(tmp_path / "nope" / "*.tar", tmp_path / "out3", tok_dir))


def test_overlapping_run_keeps_a_live_writers_tmp(tmp_path, tok_dir):
    import socket
    import subprocess
    import sys

    src, out = tmp_path / "src", tmp_path / "out"
    write_shards(src, SyntheticSpec(num_shards=1, samples_per_shard=3, resolution=R))
    out.mkdir()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = socket.gethostname()
    try:
        (out / f"00000.tar.tmp.{host}.{live.pid}").write_bytes(b"being written by another task")
        (out / f"00000.tar.tmp.{host}.{dead.pid}").write_bytes(b"killed run")
        (out / "00000.tar.tmp.other-node.1").write_bytes(b"another node's run")
        m = run_extract(cfg(src / "00000.tar", out, tok_dir))
    finally:
        live.kill()
        live.wait()
    # deleting the live tmp made the other task's os.replace fail (FileNotFoundError) at the end of its shard
    assert (out / f"00000.tar.tmp.{host}.{live.pid}").exists() and (out / "00000.tar.tmp.other-node.1").exists()
    assert not (out / f"00000.tar.tmp.{host}.{dead.pid}").exists()
    assert m["totals"] == {"written": 3} and len(read_out(out / "00000.tar")) == 3


def _gone(pid):
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] in "ZX"
    except FileNotFoundError:
        return True


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="needs /proc (Linux)")
def test_sigkilled_extract_leaves_no_decoding_workers(tmp_path, tok_dir):
    import os
    import signal
    import subprocess
    import sys
    import time

    src, out = tmp_path / "src", tmp_path / "out"
    write_shards(src, SyntheticSpec(num_shards=1, samples_per_shard=2000, resolution=128))
    code = (f"from vqd_scale.data.extract import ExtractConfig, run_extract; run_extract(ExtractConfig("
            f"inputs={str(src / '00000.tar')!r}, out_dir={str(out)!r}, tokenizer={str(tok_dir)!r}, resolution={R}, "
            f"batch_size=16, num_workers=2, progress=False))")
    p = subprocess.Popen([sys.executable, "-c", code])
    try:
        deadline = time.time() + 60
        workers = []
        while time.time() < deadline and len(workers) < 2:  # mid-shard: tmp output and both workers exist
            time.sleep(0.2)
            kids = Path(f"/proc/{p.pid}/task/{p.pid}/children")
            workers = kids.read_text().split() if kids.exists() and list(out.glob("*.tmp*")) else []
        assert len(workers) == 2, "extraction did not reach the middle of the shard"
        time.sleep(1.0)  # let the workers fill the pipe to the parent
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
    deadline = time.time() + 15
    while time.time() < deadline and not all(_gone(w) for w in workers):
        time.sleep(0.2)
    left = [w for w in workers if not _gone(w)]
    for w in left:
        os.kill(int(w), signal.SIGKILL)
    assert not left, "DataLoader workers outlived a SIGKILLed vqd-extract (blocked on the parent's pipe)"


def test_cli_refuses_bad_flags_with_a_message(tmp_path, tok_dir, caplog):
    src = tmp_path / "src"
    write_shards(src, SyntheticSpec(samples_per_shard=2, resolution=R))
    base = ["--inputs", str(src / "00000.tar"), "--out-dir", str(tmp_path / "out"), "--tokenizer", str(tok_dir),
            "--no-progress"]
    assert extract_main(base + ["--resolution", str(R + 4)]) == 2  # not a multiple of the patch size 8
    assert "not a multiple" in caplog.text and not (tmp_path / "out" / "manifest.json").exists()
    assert extract_main(["--inputs", str(tmp_path / "nope" / "*.tar")] + base[2:]) == 2
    assert "no input shards" in caplog.text
