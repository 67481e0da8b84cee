"""Real-data input handling: tars cut at a member header, replaced inputs, defaults, image size, exact captions."""
import io
import json
import os
import tarfile

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from vqd_scale.cli.extract import main as extract_main
from vqd_scale.data.extract import ExtractConfig, run_extract
from vqd_scale.data.inputs import TRUNCATED, iter_raw_samples
from vqd_scale.data.synthetic import SyntheticSpec, synthetic_images, write_shards
from vqd_scale.models.vqvae import KMeansTokenizer

R = 32


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    tok = KMeansTokenizer.fit(synthetic_images(60, R), patch=8, num_codes=24, seed=0, name="km")
    tok.resolution = R
    tok.save(d)
    return d


def header_offsets(data: bytes) -> tuple[list[int], int]:
    """Offsets of every member header (PAX headers included) and of the end blocks, walked from the tar format."""
    out, off = [], 0
    while off + 512 <= len(data) and data[off:off + 512] != b"\0" * 512:
        out.append(off)
        info = tarfile.TarInfo.frombuf(data[off:off + 512], "utf-8", "surrogateescape")
        off += 512 + -(-info.size // 512) * 512
    return out, off


def test_every_header_boundary_cut_is_counted_as_truncated(tmp_path):
    """Cut at each member header (what an interrupted copy leaves): nothing vanishes uncounted."""
    write_shards(tmp_path / "src", SyntheticSpec(num_shards=1, samples_per_shard=6, resolution=R))
    whole = (tmp_path / "src" / "00000.tar").read_bytes()
    stats = (tmp_path / "src" / "00000_stats.json").read_text()
    with tarfile.open(fileobj=io.BytesIO(whole)) as tf:
        members = [m for m in tf.getmembers() if m.isfile()]
    order = list(dict.fromkeys(m.name.split(".")[0] for m in members))  # sample keys in shard order
    ends = {}  # key → offset where its last member's data ends (a cut there or later keeps it whole)
    for m in members:
        ends[m.name.split(".")[0]] = m.offset_data + m.size
    heads, end = header_offsets(whole)
    cuts = heads[1:] + [end, end + 512]  # every header but the first, no end blocks, one of the two
    assert len(cuts) >= 3 * 6  # PAX + member headers of 6 samples × 3 members
    cut_dir = tmp_path / "cut"
    cut_dir.mkdir()
    for with_stats in (True, False):
        for cut in cuts:
            path = cut_dir / "00000.tar"
            path.write_bytes(whole[:cut])
            if with_stats:
                (cut_dir / "00000_stats.json").write_text(stats)
            else:
                (cut_dir / "00000_stats.json").unlink(missing_ok=True)
            events = list(iter_raw_samples(str(path)))
            samples = [(k, g) for k, g, r in events if r is None]
            reasons = [r for _, _, r in events if r is not None]
            assert reasons == [TRUNCATED], (cut, reasons)  # exactly one truncation event, no other skip
            keys = [k for k, _ in samples]
            assert keys == order[:len(keys)]  # a prefix of the shard, in order
            assert all("txt" in g and "jpg" in g for _, g in samples)  # never a sample without its caption
            whole_before = [k for k in order if ends[k] <= cut]
            assert set(whole_before) <= set(keys)  # every sample wholly before the cut survives
            lost = events[-1][1]["_lost"]
            assert lost == (6 - len(keys) if with_stats else None)
    # the complete shard, and a cut inside the zero padding after the two end blocks, are not truncated
    for data in (whole, whole[:end + 1024]):
        (cut_dir / "00000.tar").write_bytes(data)
        assert [r for *_, r in iter_raw_samples(str(cut_dir / "00000.tar"))] == [None] * 6


def test_stats_file_catches_a_short_shard_with_an_intact_end(tmp_path):
    """A shard rewritten with fewer samples than img2dataset reported (end blocks intact) is truncated too."""
    write_shards(tmp_path, SyntheticSpec(num_shards=1, samples_per_shard=4, resolution=R))
    stats = json.loads((tmp_path / "00000_stats.json").read_text())
    (tmp_path / "00000_stats.json").write_text(json.dumps({**stats, "successes": 7}))
    events = list(iter_raw_samples(str(tmp_path / "00000.tar")))
    assert [r for *_, r in events] == [None] * 4 + [TRUNCATED] and events[-1][1]["_lost"] == 3


def test_truncated_shard_fails_the_run_and_is_in_the_manifest(tmp_path, tok_dir):
    src, out = tmp_path / "laion", tmp_path / "out"
    write_shards(src, SyntheticSpec(num_shards=2, samples_per_shard=5, resolution=R))
    whole = (src / "00001.tar").read_bytes()
    heads = header_offsets(whole)[0]
    cut = heads[len(heads) // 5 * 2 + 1]  # inside the third sample (its first member's header gone)
    (src / "00001.tar").write_bytes(whole[:cut])
    args = ["--inputs", str(src / "{00000..00001}.tar"), "--out-dir", str(out), "--tokenizer", str(tok_dir),
            "--no-progress"]
    assert extract_main(args + ["--fail-on-invalid-shard"]) == 2
    d = json.loads((out / "00001.done.json").read_text())
    assert d["skipped"] == {"truncated_tar": 1} and d["written"] == 2 and d["lost_samples"] == 3 == 5 - 2
    assert d["expected_samples"] == 5
    m = json.loads((out / "manifest.json").read_text())
    assert m["truncated_shards"] == ["00001.tar"] and m["num_failed_shards"] == 0
    assert m["totals"]["lost_samples"] == 5 - d["written"] and m["totals"]["written"] == 5 + d["written"]
    assert extract_main(args) == 0  # without the flag the run succeeds and reports it
    (src / "00001_stats.json").unlink()  # without img2dataset's count the loss is unknown, not 0
    assert extract_main(args[:3] + [str(tmp_path / "out2")] + args[4:]) == 0
    d = json.loads((tmp_path / "out2" / "00001.done.json").read_text())
    assert d["skipped"] == {"truncated_tar": 1} and d["lost_samples"] is None and d["expected_samples"] is None


def test_replaced_input_is_extracted_again(tmp_path, tok_dir):
    """Re-downloading a broken shard: the rerun notices (size/mtime in the done-marker) and redoes it."""
    src, out = tmp_path / "cc", tmp_path / "out"
    write_shards(src, SyntheticSpec(num_shards=2, samples_per_shard=4, resolution=R))
    whole = (src / "00001.tar").read_bytes()
    heads = header_offsets(whole)[0]
    (src / "00001.tar").write_bytes(whole[:heads[len(heads) // 4 * 2]])  # a partial download: 2 of 4 samples
    c = ExtractConfig(inputs=str(src / "{00000..00001}.tar"), out_dir=str(out), tokenizer=str(tok_dir), progress=False)
    m = run_extract(c)
    assert m["totals"]["written"] == 4 + 2 and m["truncated_shards"] == ["00001.tar"]
    done0 = (out / "00000.done.json").stat().st_mtime_ns
    (src / "00001.tar").write_bytes(whole)  # downloaded again, complete
    st = os.stat(src / "00001.tar")
    os.utime(src / "00001.tar", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # even on a coarse-mtime file system
    # another task's manifest (it does not own the shard) lists the stale output as pending, not as done
    m = run_extract(ExtractConfig(**{**c.__dict__, "num_tasks": 2, "task_index": 0}))
    assert m["changed_inputs"] == ["00001.tar"] and m["pending_inputs"] == ["00001.tar"] and not m["complete"]
    m = run_extract(c)
    assert m["totals"] == {"written": 8} and m["truncated_shards"] == [] and m["complete"]
    assert (out / "00000.done.json").stat().st_mtime_ns == done0  # the unchanged shard is not redone
    d = json.loads((out / "00001.done.json").read_text())
    assert (d["input_size"], d["input_mtime_ns"]) == (len(whole), os.stat(src / "00001.tar").st_mtime_ns)
    assert len(list(wds.WebDataset(str(out / "00001.tar"), shardshuffle=False))) == 4


def test_defaults_come_from_the_tokenizer_and_the_inputs(tmp_path, tok_dir, caplog):
    """No --resolution: the tokenizer's (not a 64 px default); no --source: the inputs' folder, not 'synthetic'."""
    from vqd_scale.models.vqvae import ImageTokenizer

    src = tmp_path / "laion"
    write_shards(src, SyntheticSpec(num_shards=1, samples_per_shard=3, resolution=64))
    m = run_extract(ExtractConfig(inputs=str(src / "00000.tar"), out_dir=str(tmp_path / "out"),
                                  tokenizer=str(tok_dir), progress=False))
    assert m["resolution"] == R and m["token_shape"] == [4, 4] and m["source"] == "laion"
    rec = next(iter(wds.WebDataset(str(tmp_path / "out" / "00000.tar"), shardshuffle=False)))
    assert json.loads(rec["json"])["source"] == "laion"
    # a tokenizer that records no resolution (a bare VQModel dir, an old save) makes --resolution required
    bare = tmp_path / "bare_tok"
    ImageTokenizer.load(tok_dir).save(bare)
    meta = json.loads((bare / "tokenizer.json").read_text())
    (bare / "tokenizer.json").write_text(json.dumps({**meta, "resolution": None}))
    args = ["--inputs", str(src / "00000.tar"), "--out-dir", str(tmp_path / "o2"), "--tokenizer", str(bare),
            "--no-progress"]
    assert extract_main(args) == 2 and "set --resolution" in caplog.text
    # inputs from differently named folders need --source
    write_shards(tmp_path / "cc", SyntheticSpec(num_shards=1, samples_per_shard=2, resolution=R))
    two = f"{src}/00000.tar::{tmp_path}/cc/00000.tar"
    assert extract_main(["--inputs", two] + args[2:] + ["--resolution", str(R)]) == 2 and "set --source" in caplog.text
    assert extract_main(["--inputs", two] + args[2:] + ["--resolution", str(R), "--source", "mix"]) == 0


def _jpeg(size, color=(0, 90, 200)):
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="JPEG")
    return buf.getvalue()


def test_small_images_skipped_original_size_and_exact_caption_kept(tmp_path, tok_dir):
    src, out = tmp_path / "web", tmp_path / "out"
    src.mkdir()
    samples = {  # key: (stored image size, img2dataset's original size or None, caption)
        "pixel": ((1, 1), None, "tracking pixel"),
        "upscaled": ((64, 64), (1, 1), "a pixel img2dataset resized to 64"),
        "icon": ((20, 20), None, "an icon"),
        "photo": ((64, 64), (640, 480), "  A photo — with café,\ttabs and trailing spaces  \n"),
        "small_ok": ((40, 40), None, "just big enough"),
    }
    with wds.TarWriter(str(src / "00000.tar")) as sink:
        for key, (size, orig, caption) in samples.items():
            meta = {"key": key, "url": f"http://x/{key}.jpg", "width": size[0], "height": size[1]}
            if orig:
                meta.update(original_width=orig[0], original_height=orig[1])
            sink.write({"__key__": key, "jpg": _jpeg(size), "txt": caption.encode(), "json": json.dumps(meta).encode()})
    assert extract_main(["--inputs", str(src / "00000.tar"), "--out-dir", str(out), "--tokenizer", str(tok_dir),
                         "--min-image-size", "32", "--no-progress"]) == 0
    d = json.loads((out / "00000.done.json").read_text())
    assert d["skipped"] == {"too_small": 3} and d["written"] == 2
    recs = {r["__key__"]: r for r in wds.WebDataset(str(out / "00000.tar"), shardshuffle=False)}
    assert recs["photo"]["txt"].decode() == samples["photo"][2]  # byte for byte, whitespace included
    assert json.loads(recs["photo"]["json"])["original_size"] == [640, 480]  # not the 64 px img2dataset stored
    assert json.loads(recs["small_ok"]["json"])["original_size"] == [40, 40]
    ids = np.load(io.BytesIO(recs["photo"]["img.tok.npy"]))
    assert ids.shape == (4, 4)
    # --min-image-size 0 keeps them all
    assert extract_main(["--inputs", str(src / "00000.tar"), "--out-dir", str(tmp_path / "all"), "--tokenizer",
                         str(tok_dir), "--min-image-size", "0", "--no-progress"]) == 0
    assert json.loads((tmp_path / "all" / "00000.done.json").read_text())["written"] == 5
