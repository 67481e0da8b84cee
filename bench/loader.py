"""Loader throughput per worker vs the raw `tarfile` ceiling on the same tars, measured in the same run.

    OMP_NUM_THREADS=1 python bench/loader.py [--shards 8 --per-shard 2000 --batch 256 --embeddings]

Prints samples/s of (a) plain tarfile reading of every member (the ceiling), (b) one loader
stream = one DataLoader worker (num_workers=0 runs it in-process, no IPC), (c) the full loader with
--workers DataLoader workers, and the ratio (b)/(a), in wall time and per CPU-second of the
process; then pre-extraction images/s with the tiny
k-means tokenizer on CPU. Targets: (b) ≥ 20k samples/s and ≥ 50 % of (a).
"""
from __future__ import annotations

import argparse
import os
import platform
import subprocess
import tarfile
import tempfile
import time
from pathlib import Path

from vqd_scale.config import DataConfig, SourceConfig
from vqd_scale.data.loader import TokenLoader
from vqd_scale.data.random_shards import write_random_token_shards


def raw_tar(paths: list[Path]) -> tuple[int, float, float]:
    """Read every member's bytes with tarfile; returns (samples, wall seconds, CPU seconds)."""
    t0, c0 = time.perf_counter(), time.process_time()
    keys = 0
    for p in paths:
        last = None
        with tarfile.open(p, mode="r|") as tf:
            for m in tf:
                tf.extractfile(m).read()
                k = m.name.split(".", 1)[0]
                keys += k != last
                last = k
    return keys, time.perf_counter() - t0, time.process_time() - c0


def loader_rate(pattern: str, workers: int, batch: int, n_samples: int, emb: bool) -> tuple[int, float, float]:
    """Iterate TokenLoader batches (after one warm-up batch); returns (samples, wall s, this process's CPU s)."""
    cfg = DataConfig(sources=[SourceConfig("bench", pattern)], batch_size=batch, num_workers=workers,
                     epoch_samples=10**9, shuffle_buffer=1000, with_embeddings=emb)
    it = iter(TokenLoader(cfg))
    next(it)
    t0, c0 = time.perf_counter(), time.process_time()
    n = 0
    while n < n_samples:
        n += len(next(it)["key"])
    return n, time.perf_counter() - t0, time.process_time() - c0


def extraction_rate(tmp: Path, n_images: int) -> tuple[int, float]:
    """vqd-extract on synthetic 64 px shards with the demo k-means tokenizer (CPU, 1 process)."""
    from vqd_scale.data.extract import ExtractConfig, run_extract, text_tokenizer
    from vqd_scale.data.synthetic import SyntheticSpec, synthetic_images, write_shards
    from vqd_scale.models.vqvae import KMeansTokenizer

    KMeansTokenizer.fit(synthetic_images(300, 64), patch=8, num_codes=256).save(tmp / "tok")
    write_shards(tmp / "img", SyntheticSpec(num_shards=2, samples_per_shard=n_images // 2, resolution=64))
    cfg = ExtractConfig(inputs=str(tmp / "img" / "{00000..00001}.tar"), out_dir=str(tmp / "out"),
                        tokenizer=str(tmp / "tok"), resolution=64, batch_size=128, progress=False)
    text_tokenizer(cfg.text_tokenizer)  # import open_clip outside the timed region (a one-off ~5 s)
    t0 = time.perf_counter()
    m = run_extract(cfg)
    return m["totals"]["written"], time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--per-shard", type=int, default=2000)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--embeddings", action="store_true", help="add 512-d float16 image/text embeddings")
    ap.add_argument("--extract-images", type=int, default=1000)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        paths = write_random_token_shards(tmp / "tok", a.shards, a.per_shard, (32, 32), 2887,
                                          embed_dim=512 if a.embeddings else None)
        total = a.shards * a.per_shard
        rec_kib = paths[0].stat().st_size / a.per_shard / 1024
        pattern = str(tmp / "tok" / f"{{00000..{a.shards - 1:05d}}}.tar")
        raw_tar(paths[:1])  # warm the page cache so both sides read from memory
        n_raw, t_raw, c_raw = raw_tar(paths)
        n_one, t_one, c_one = loader_rate(pattern, 0, a.batch, total, a.embeddings)
        n_all, t_all, _ = loader_rate(pattern, a.workers, a.batch, 2 * total, a.embeddings)
        n_ext, t_ext = extraction_rate(tmp, a.extract_images)
    raw, one, full = n_raw / t_raw, n_one / t_one, n_all / t_all
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.machine()) if Path("/proc/cpuinfo").exists() else platform.machine()
    print(f"machine: {cpu}, {os.cpu_count()} cores, load avg {os.getloadavg()[0]:.1f}, commit {commit}")
    print(f"records: 32x32 int16 tokens + 77 int32 text{' + 2x512 fp16 emb' if a.embeddings else ''}, "
          f"({rec_kib:.1f} KiB per record in the tar), batch {a.batch}")
    # per CPU-second = what one worker does on an idle core (wall rates suffer on a shared machine)
    print(f"raw tarfile ceiling:       {raw:10.0f} samples/s  {n_raw / c_raw:10.0f} per CPU-s")
    print(f"loader, one worker stream: {one:10.0f} samples/s  {n_one / c_one:10.0f} per CPU-s  "
          f"ratio vs raw {one / raw:.2f} (CPU {(n_one / c_one) / (n_raw / c_raw):.2f})")
    print(f"loader, {a.workers} DataLoader workers: {full:8.0f} samples/s  ({full / a.workers:.0f} per worker)")
    print(f"extraction (k-means tokenizer, 64 px, CPU): {n_ext / t_ext:.0f} images/s")


if __name__ == "__main__":
    main()
