"""Captioned synthetic images (coloured shapes at positions) in img2dataset's exact shard format.

The caption determines the content (colour × shape × position, optionally two objects), so a model
trained on it can be checked by attribute accuracy: `image_attributes` classifies a decoded image
heuristically (robust to blur), `caption_attributes` parses a caption, `attribute_accuracy` compares.
"""
from __future__ import annotations

import hashlib
import io
import json
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Optional

if TYPE_CHECKING:  # torch is imported lazily: the img2dataset writer does not need it
    import torch

import numpy as np
from PIL import Image, ImageDraw

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40), "green": (40, 190, 60), "blue": (50, 90, 235), "yellow": (235, 215, 40),
}
SHAPES = ("circle", "square", "triangle")
# position name → centre as a fraction of the image side (x, y)
POSITIONS: dict[str, tuple[float, float]] = {
    "top left": (0.25, 0.25), "top right": (0.75, 0.25), "bottom left": (0.25, 0.75),
    "bottom right": (0.75, 0.75), "center": (0.5, 0.5),
}
CORNERS = ("top left", "top right", "bottom left", "bottom right")
BACKGROUND = (28, 28, 32)


@dataclass
class SyntheticSpec:
    """What to generate: shard count, samples per shard, resolution, two-object fraction, seed."""
    num_shards: int = 4
    samples_per_shard: int = 256
    resolution: int = 64
    two_object_prob: float = 0.0
    seed: int = 0
    jpeg_quality: int = 95
    captioned: bool = True  # False: image-only shards (no txt member), like downloads without alt text


def _phrase(obj: dict) -> str:
    where = "in the center" if obj["position"] == "center" else f"at the {obj['position']}"
    return f"a {obj['color']} {obj['shape']} {where}"


def sample_scene(rng: np.random.Generator, two_object_prob: float = 0.0) -> list[dict]:
    """Draw one scene: 1 or 2 objects with distinct positions (two objects use corners only)."""
    two = rng.random() < two_object_prob
    positions = list(rng.choice(len(CORNERS), size=2, replace=False)) if two else [rng.integers(len(POSITIONS))]
    names = CORNERS if two else tuple(POSITIONS)
    return [{"color": list(COLORS)[rng.integers(len(COLORS))], "shape": SHAPES[rng.integers(len(SHAPES))],
             "position": names[int(p)]} for p in positions]


def caption_of(scene: list[dict]) -> str:
    """Scene → caption, e.g. "a red circle at the top left and a blue square in the center"."""
    return " and ".join(_phrase(o) for o in scene)


def render(scene: list[dict], resolution: int, rng: np.random.Generator) -> Image.Image:
    """Draw the scene with small jitter in size, position and colour (deterministic given rng)."""
    img = Image.new("RGB", (resolution, resolution), BACKGROUND)
    draw = ImageDraw.Draw(img)
    for obj in scene:
        fx, fy = POSITIONS[obj["position"]]
        r = resolution * rng.uniform(0.12, 0.16)
        cx = resolution * fx + rng.uniform(-0.03, 0.03) * resolution
        cy = resolution * fy + rng.uniform(-0.03, 0.03) * resolution
        color = tuple(int(np.clip(c + rng.integers(-15, 16), 0, 255)) for c in COLORS[obj["color"]])
        if obj["shape"] == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=color)
        elif obj["shape"] == "square":
            s = r * 0.89  # side ≈ 1.8 r: a square about as large as the circle, not visibly bigger
            draw.rectangle([cx - s, cy - s, cx + s, cy + s], fill=color)
        else:
            draw.polygon([(cx, cy - r * 1.1), (cx - r * 1.1, cy + r * 0.9), (cx + r * 1.1, cy + r * 0.9)], fill=color)
    return img


def make_sample(spec: SyntheticSpec, shard: int, index: int) -> tuple[Image.Image, str, list[dict]]:
    """The (image, caption, scene) of one sample, a pure function of (seed, shard, index)."""
    rng = np.random.default_rng([spec.seed, shard, index])
    scene = sample_scene(rng, spec.two_object_prob)
    return render(scene, spec.resolution, rng), caption_of(scene), scene


def synthetic_images(n: int, resolution: int, seed: int = 0, two_object_prob: float = 0.0,
                     shard: int = 10**6) -> "torch.Tensor":
    """n images F[n,3,R,R] in [-1,1] (default shard id 10**6, so they differ from written training shards)."""
    import torch

    spec = SyntheticSpec(resolution=resolution, seed=seed, two_object_prob=two_object_prob)
    arr = np.stack([np.asarray(make_sample(spec, shard, i)[0]) for i in range(n)])  # [n,R,R,3] uint8
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 127.5 - 1


def write_shards(out_dir: str | Path, spec: SyntheticSpec, shard_ids: Optional[Iterable[int]] = None) -> list[Path]:
    """Write img2dataset-format shards `{00000..}.tar` (+ `_stats.json`) into out_dir; returns tar paths."""
    import webdataset as wds

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for shard in (range(spec.num_shards) if shard_ids is None else shard_ids):
        start = time.time()
        path = out / f"{shard:05d}.tar"
        with wds.TarWriter(str(path)) as sink:
            for i in range(spec.samples_per_shard):
                img, caption, scene = make_sample(spec, shard, i)
                buf = io.BytesIO()
                img.save(buf, format="JPEG", quality=spec.jpeg_quality)
                jpg = buf.getvalue()
                key = f"{shard:05d}{i:04d}"  # img2dataset: shard digits + sample digits
                shown = caption if spec.captioned else None
                meta = {"url": f"synthetic://{spec.seed}/{key}", "caption": shown, "key": key,
                        "status": "success", "error_message": None, "width": spec.resolution,
                        "height": spec.resolution, "original_width": spec.resolution,
                        "original_height": spec.resolution, "exif": "{}",
                        "sha256": hashlib.sha256(jpg).hexdigest(), "scene": scene}
                rec = {"__key__": key, "jpg": jpg, "json": json.dumps(meta).encode()}
                if spec.captioned:
                    rec["txt"] = caption.encode()
                sink.write(rec)
        n = spec.samples_per_shard
        stats = {"count": n, "successes": n, "failed_to_download": 0, "failed_to_resize": 0,
                 "duration": time.time() - start, "start_time": start, "end_time": time.time(),
                 "status_dict": {"success": n}}
        (out / f"{shard:05d}_stats.json").write_text(json.dumps(stats, indent=4))
        paths.append(path)
    return paths


_PAIR = re.compile(r"\b(" + "|".join(COLORS) + r")\s+(" + "|".join(SHAPES) + r")\b")
_POS = re.compile(r"\b(top left|top right|bottom left|bottom right|center)\b")


def caption_attributes(caption: str) -> dict[str, Any]:
    """Parse a caption: {"objects": [{color, shape, position}, ...]} plus the first object's fields."""
    objects = []
    for part in caption.lower().split(" and "):
        m, p = _PAIR.search(part), _POS.search(part)
        if m:
            objects.append({"color": m.group(1), "shape": m.group(2), "position": p.group(1) if p else None})
    first = objects[0] if objects else {"color": None, "shape": None, "position": None}
    return {**first, "objects": objects}


def _to_uint8(image: Any) -> np.ndarray:
    """PIL image, uint8 HWC array, or float CHW tensor/array in [-1, 1] → uint8 HWC."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    arr = np.asarray(image.detach().cpu().float() if hasattr(image, "detach") else image)
    if arr.dtype != np.uint8:
        arr = arr.transpose(1, 2, 0) if arr.shape[0] == 3 and arr.shape[-1] != 3 else arr
        arr = ((np.clip(arr, -1, 1) + 1) * 127.5).round().astype(np.uint8)
    return arr


def _best_template(crop: np.ndarray) -> str:
    """Shape whose template (fitted to the object's bounding box) overlaps the mask best (IoU)."""
    bh, bw = crop.shape
    tmpl = Image.new("L", (bw * 4, bh * 4), 0)  # 4× supersampled templates: tiny objects stay fair
    ious = {}
    for shape in SHAPES:
        tmpl.paste(0, (0, 0, bw * 4, bh * 4))
        d = ImageDraw.Draw(tmpl)
        box = (0, 0, bw * 4 - 1, bh * 4 - 1)
        if shape == "circle":
            d.ellipse(box, fill=255)
        elif shape == "square":
            d.rectangle(box, fill=255)
        else:
            d.polygon([(bw * 2, 0), (0, bh * 4 - 1), (bw * 4 - 1, bh * 4 - 1)], fill=255)
        t = np.asarray(tmpl.resize((bw, bh), Image.BILINEAR)) > 127
        ious[shape] = (t & crop).sum() / max((t | crop).sum(), 1)
    return max(ious, key=ious.get)


def image_attributes(image: Any, min_area_frac: float = 0.01) -> dict[str, Any]:
    """Classify objects in an image by colour (nearest palette entry), position (nearest centre), shape (template IoU)."""
    from scipy import ndimage

    arr = _to_uint8(image).astype(np.float32)
    h, w, _ = arr.shape
    border = np.concatenate([arr[0], arr[-1], arr[:, 0], arr[:, -1]])
    bg = np.median(border, axis=0)
    dist = np.linalg.norm(arr - bg, axis=-1)
    # half the strongest contrast: blur spreads edges, the object core stays above it
    mask = dist > max(40.0, 0.5 * float(dist.max()))
    labels, n = ndimage.label(mask)
    objects = []
    palette = np.array(list(COLORS.values()), dtype=np.float32)
    for lab in range(1, n + 1):
        comp = labels == lab
        area = int(comp.sum())
        if area < min_area_frac * h * w:
            continue
        # re-threshold at half this object's own peak contrast so blur does not fatten or shrink it
        comp = ndimage.binary_dilation(comp, iterations=2) & (dist > 0.5 * float(dist[comp].max()))
        ys, xs = np.nonzero(comp)
        shape = _best_template(comp[ys.min(): ys.max() + 1, xs.min(): xs.max() + 1])
        colour = np.median(arr[comp], axis=0)
        color = list(COLORS)[int(np.argmin(np.linalg.norm(palette - colour, axis=1)))]
        cy, cx = (ys.mean() + 0.5) / h, (xs.mean() + 0.5) / w
        position = min(POSITIONS, key=lambda k: (POSITIONS[k][0] - cx) ** 2 + (POSITIONS[k][1] - cy) ** 2)
        objects.append({"color": color, "shape": shape, "position": position, "area": area})
    objects.sort(key=lambda o: -o["area"])
    first = objects[0] if objects else {"color": None, "shape": None, "position": None}
    return {"color": first["color"], "shape": first["shape"], "position": first["position"], "objects": objects}


def attribute_accuracy(captions: list[str], images: Iterable[Any]) -> dict[str, float]:
    """Per caption object: colour/shape of the image object at its position; per image: object count.

    `position` needs an object at the caption's position *and* no extra objects, so a clutter of
    fragments (an object at every position) fails it; `count` = as many objects as the caption names;
    `all` = count right and every attribute of every caption object right.
    """
    hits = {"color": 0, "shape": 0, "position": 0}
    n_obj = n_img = all_ok = count_ok = 0
    for caption, image in zip(captions, images):
        want, got = caption_attributes(caption)["objects"], image_attributes(image)["objects"]
        at = {}
        for o in got:  # largest object first, so it wins a position
            at.setdefault(o["position"], o)
        same_count = len(got) == len(want)
        ok_img = bool(want) and same_count
        for o in want:
            g = at.get(o["position"])
            ok = {"position": g is not None and same_count, "color": g is not None and g["color"] == o["color"],
                  "shape": g is not None and g["shape"] == o["shape"]}
            for k, v in ok.items():
                hits[k] += v
            ok_img &= all(ok.values())
            n_obj += 1
        count_ok += same_count
        all_ok += ok_img
        n_img += 1
    out = {k: v / max(n_obj, 1) for k, v in hits.items()}
    out["count"] = count_ok / max(n_img, 1)
    out["all"] = all_ok / max(n_img, 1)
    return out
