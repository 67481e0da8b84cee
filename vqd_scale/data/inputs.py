"""Reading img2dataset input shards robustly: every bad sample becomes a counted skip reason, never a crash."""
from __future__ import annotations

import io
import json
import tarfile
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


def _split(name: str) -> tuple[str, str]:
    """`dir/KEY.ext.more` → (`dir/KEY`, `ext.more`), WebDataset's key rule (first dot of the basename)."""
    slash = name.rfind("/") + 1
    dot = name.find(".", slash)
    return (name, "") if dot < 0 else (name[:dot], name[dot + 1:].lower())


def iter_raw_samples(path: str) -> Iterator[tuple[str, dict[str, bytes], Optional[str]]]:
    """Yield (key, {ext: bytes}, None) per sample, or (key, {}, reason) for shard-level problems."""
    seen: set[str] = set()
    key, group = None, {}
    try:
        with tarfile.open(path, mode="r|*") as tf:  # streaming: a truncated tail raises, earlier samples survive
            for m in tf:
                if not m.isfile():
                    continue
                k, ext = _split(m.name)
                data = tf.extractfile(m).read()
                if k != key:
                    if key is not None:
                        yield from _emit(key, group, seen)
                    key, group = k, {}
                group[ext] = data
    except (tarfile.TarError, OSError, EOFError, ValueError) as e:
        reason = UNREADABLE if key is None else TRUNCATED
        # the partially read sample is dropped: its last member may be cut short
        yield (key or path, {}, reason) if key is None else (key, {"_error": str(e).encode()}, reason)
        return
    if key is not None:
        yield from _emit(key, group, seen)


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


def decode_sample(key: str, group: dict[str, bytes], resolution: int, center_crop: bool) -> dict:
    """Raw members → {"key", "image" uint8 [R,R,3], "caption", "original_size", "meta", "skip": None}, or a skip."""
    out = {"key": key, "skip": None}
    ext = next((e for e in IMAGE_EXTS if e in group), None)
    if ext is None:
        return {**out, "skip": MISSING_IMAGE}
    if len(group[ext]) == 0:
        return {**out, "skip": EMPTY_IMAGE}
    caption = group.get("txt", b"").decode("utf-8", errors="replace").strip()
    if not caption:
        return {**out, "skip": MISSING_CAPTION}
    try:
        with Image.open(io.BytesIO(group[ext])) as img:
            img.load()
            size = img.size
            rgb = resize_crop(to_rgb(img), resolution, center_crop)
    except Exception:  # PIL raises many types (OSError, SyntaxError, DecompressionBombError, …)
        return {**out, "skip": UNDECODABLE}
    try:
        meta = json.loads(group.get("json", b"{}") or b"{}")
    except ValueError:
        meta = {}
    return {**out, "image": np.asarray(rgb, dtype=np.uint8), "caption": caption,
            "original_size": list(size), "meta": meta if isinstance(meta, dict) else {}}


class ShardSamples(torch.utils.data.IterableDataset):
    """One input shard's decoded samples; DataLoader workers share the decoding (sample i → worker i mod W)."""

    def __init__(self, path: str, resolution: int, center_crop: bool):
        super().__init__()
        self.path, self.resolution, self.center_crop = path, resolution, center_crop

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        wid, nw = (0, 1) if info is None else (info.id, info.num_workers)
        for i, (key, group, reason) in enumerate(iter_raw_samples(self.path)):
            if reason is not None:
                # shard-level events are reported once (by worker 0), sample-level ones by their owner
                if (reason in (TRUNCATED, UNREADABLE) and wid == 0) or (reason == DUPLICATE and i % nw == wid):
                    yield {"key": key, "skip": reason}
                continue
            if i % nw == wid:
                yield decode_sample(key, group, self.resolution, self.center_crop)
