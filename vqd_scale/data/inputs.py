"""Reading img2dataset input shards robustly: every bad sample becomes a counted skip reason, never a crash."""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch
from PIL import Image, ImageOps

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")

# skip reasons (keys of the done-marker's "skipped" dict)
TRUNCATED = "truncated_tar"
UNREADABLE = "unreadable_shard"
MISSING_IMAGE = "missing_image"
EMPTY_IMAGE = "empty_image"
UNDECODABLE = "undecodable_image"
MISSING_CAPTION = "missing_caption"
DUPLICATE = "duplicate_key"
TOO_SMALL = "too_small"  # original shorter side below --min-image-size


def _split(name: str) -> tuple[str, str]:
    """`dir/KEY.ext.more` → (`dir/KEY`, `ext.more`), WebDataset's key rule (first dot of the basename)."""
    slash = name.rfind("/") + 1
    dot = name.find(".", slash)
    return (name, "") if dot < 0 else (name[:dot], name[dot + 1:].lower())


class _EndAwareInfo(tarfile.TarInfo):
    """Remembers the header error that ended the archive: tarfile takes a tar cut exactly at a member
    header (no end-of-archive blocks) for a normal end, and the rest of the shard would vanish uncounted."""

    @classmethod
    def fromtarfile(cls, tf):
        try:
            return super().fromtarfile(tf)
        except tarfile.HeaderError as e:
            tf.vqd_end = e
            raise


def _ended_cleanly(tf: tarfile.TarFile) -> bool:
    """True when the archive ended with the two zero blocks that end a complete tar."""
    if not isinstance(getattr(tf, "vqd_end", None), tarfile.EOFHeaderError):
        return False  # no header at all (cut at a header), half a header, or garbage where a header belongs
    return tf.fileobj.read(tarfile.BLOCKSIZE) == tarfile.NUL * tarfile.BLOCKSIZE  # the second zero block


def _starts_as_tar(path: str) -> bool:
    """The first block is a valid tar header: a tar cut before its first sample, not a non-tar."""
    try:
        with open(path, "rb") as f:
            tarfile.TarInfo.frombuf(f.read(tarfile.BLOCKSIZE), "utf-8", "surrogateescape")
        return True
    except (OSError, tarfile.HeaderError):
        return False


def stats_path(path: str) -> Path:
    """`dir/00012.tar` → `dir/00012_stats.json`, img2dataset's per-shard counts."""
    p = Path(path)
    return p.with_name(p.name[: -len(".tar")] + "_stats.json" if p.name.endswith(".tar") else p.name + "_stats.json")


def expected_samples(path: str) -> Optional[int]:
    """Samples img2dataset wrote into the shard (`successes` of its stats file), None when unknown."""
    try:
        n = json.loads(stats_path(path).read_text())["successes"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return n if isinstance(n, int) and n >= 0 else None


def iter_raw_samples(path: str) -> Iterator[tuple[str, dict[str, bytes], Optional[str]]]:
    """Yield (key, {ext: bytes}, None) per sample, or (key, {"_error", "_lost"}, reason) for shard-level problems.

    A shard is truncated when reading fails mid-member, when it lacks the end-of-archive blocks, or when
    it holds fewer samples than its img2dataset stats file says; the event comes last, `_lost` = samples
    known to be missing (None without a stats file).
    """
    seen: set[str] = set()
    key, group, emitted = None, {}, 0
    error = None
    try:
        with tarfile.open(path, mode="r|*", tarinfo=_EndAwareInfo) as tf:  # streaming: earlier samples survive
            for m in tf:
                if not m.isfile():
                    continue
                k, ext = _split(m.name)
                data = tf.extractfile(m).read()
                if k != key:
                    if key is not None:
                        emitted += 1
                        yield from _emit(key, group, seen)
                    key, group = k, {}
                group[ext] = data
            if not _ended_cleanly(tf):
                error = "no end-of-archive blocks (cut at a member header, or damaged)"
    except (tarfile.TarError, OSError, EOFError, ValueError) as e:
        if key is None and not _starts_as_tar(path):  # empty, not a tar, unreadable file
            yield path, {"_error": str(e).encode()}, UNREADABLE
            return
        error = str(e)  # a member cut short raises before it joins `group`: what the group holds is whole
    expected = expected_samples(path)
    keys = emitted + (key is not None)
    if error is None and expected is not None and keys < expected:
        error = f"{keys} samples but its stats file says {expected}"
    if key is not None and (error is None or _complete(group)):
        emitted += 1
        yield from _emit(key, group, seen)
    if error is not None:  # the cut sample (image without caption …) is part of the truncation, not a skip of its own
        lost = None if expected is None else max(expected - emitted, 0)
        yield key or path, {"_error": error.encode(), "_lost": lost}, TRUNCATED


def _complete(group: dict) -> bool:
    """A sample with an image and a caption: the last one before a cut is kept (its json may be gone)."""
    return "txt" in group and any(e in group for e in IMAGE_EXTS)


def _emit(key: str, group: dict, seen: set) -> Iterator[tuple[str, dict, Optional[str]]]:
    if key in seen:
        yield key, {}, DUPLICATE
        return
    seen.add(key)
    yield key, group, None


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode (L, LA, RGBA, CMYK, P, I;16 …) → RGB; transparency is composited over white."""
    img = ImageOps.exif_transpose(img)
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA"):
        bg = Image.new("RGB", img.size, (255, 255, 255))
        bg.paste(img.convert("RGBA"), mask=img.convert("RGBA").getchannel("A"))
        return bg
    if img.mode.startswith("I"):  # 16/32-bit grey: scale into 8 bits instead of clipping
        arr = np.asarray(img, dtype=np.float64)
        arr = (255 * (arr - arr.min()) / max(float(np.ptp(arr)), 1.0)).astype(np.uint8)
        return Image.fromarray(arr).convert("RGB")
    return img.convert("RGB")


def resize_crop(img: Image.Image, resolution: int, center_crop: bool) -> Image.Image:
    """Shorter side → resolution then centre crop; or squash to resolution² when center_crop is False."""
    if not center_crop:
        return img.resize((resolution, resolution), Image.BICUBIC)
    w, h = img.size
    s = resolution / min(w, h)
    nw, nh = max(resolution, round(w * s)), max(resolution, round(h * s))
    img = img.resize((nw, nh), Image.BICUBIC)
    left, top = (nw - resolution) // 2, (nh - resolution) // 2
    return img.crop((left, top, left + resolution, top + resolution))


def original_size(meta: dict, decoded: tuple[int, int]) -> list[int]:
    """[w, h] of the image as downloaded: img2dataset's original_width/height (it may have resized it), else decoded."""
    w, h = meta.get("original_width"), meta.get("original_height")
    ok = all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (w, h))
    return [w, h] if ok else list(decoded)


def decode_sample(key: str, group: dict[str, bytes], resolution: int, center_crop: bool, min_size: int = 0,
                  keep_uncaptioned: bool = False) -> dict:
    """Raw members → {"key", "image" uint8 [R,R,3], "caption", "original_size", "meta", "skip": None}, or a skip.

    The caption is kept exactly as written (a blank one is missing: skipped, or with `keep_uncaptioned` the
    image is kept with caption None); images whose original shorter side is below `min_size` (tracking
    pixels, icons) are skipped as too small.
    """
    out = {"key": key, "skip": None}
    ext = next((e for e in IMAGE_EXTS if e in group), None)
    if ext is None:
        return {**out, "skip": MISSING_IMAGE}
    if len(group[ext]) == 0:
        return {**out, "skip": EMPTY_IMAGE}
    caption = group.get("txt", b"").decode("utf-8", errors="replace")
    if not caption.strip():
        if not keep_uncaptioned:
            return {**out, "skip": MISSING_CAPTION}
        caption = None
    try:
        meta = json.loads(group.get("json", b"{}") or b"{}")
    except ValueError:
        meta = {}
    meta = meta if isinstance(meta, dict) else {}
    try:
        with Image.open(io.BytesIO(group[ext])) as img:
            size = original_size(meta, img.size)
            if min(size) < min_size:
                return {**out, "skip": TOO_SMALL, "original_size": size}
            img.load()
            rgb = resize_crop(to_rgb(img), resolution, center_crop)
    except Exception:  # PIL raises many types (OSError, SyntaxError, DecompressionBombError, …)
        return {**out, "skip": UNDECODABLE}
    return {**out, "image": np.asarray(rgb, dtype=np.uint8), "caption": caption, "original_size": size, "meta": meta}


class ShardSamples(torch.utils.data.IterableDataset):
    """One input shard's decoded samples; DataLoader workers share the decoding (sample i → worker i mod W)."""

    def __init__(self, path: str, resolution: int, center_crop: bool, min_size: int = 0,
                 keep_uncaptioned: bool = False):
        super().__init__()
        self.path, self.resolution, self.center_crop, self.min_size = path, resolution, center_crop, min_size
        self.keep_uncaptioned = keep_uncaptioned

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        wid, nw = (0, 1) if info is None else (info.id, info.num_workers)
        for i, (key, group, reason) in enumerate(iter_raw_samples(self.path)):
            if reason is not None:
                # shard-level events are reported once (by worker 0), sample-level ones by their owner
                if (reason in (TRUNCATED, UNREADABLE) and wid == 0) or (reason == DUPLICATE and i % nw == wid):
                    yield {"key": key, "skip": reason, "lost": group.get("_lost"),
                           "error": group.get("_error", b"").decode(errors="replace")}
                continue
            if i % nw == wid:
                yield decode_sample(key, group, self.resolution, self.center_crop, self.min_size, self.keep_uncaptioned)
