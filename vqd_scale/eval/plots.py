"""Eval figures: the PNG sample grid of a checkpoint and the loss/metric-vs-step curves (matplotlib Agg)."""
from __future__ import annotations

import json
import math
import os
import textwrap
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """F[B,3,H,W] in [-1,1] → uint8 [B,H,W,3]."""
    x = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).numpy()  # [B,3,H,W] → [B,H,W,3]


def _cell_image(sample: np.ndarray, reference: Optional[np.ndarray], scale: int, pad: int) -> Image.Image:
    """One sample (and its held-out reference to the right of it), upscaled without smoothing."""
    h, w, _ = sample.shape
    parts = [sample] if reference is None else [sample, np.full((h, max(pad // scale, 1), 3), 255, np.uint8), reference]
    row = np.concatenate(parts, axis=1)
    return Image.fromarray(row).resize((row.shape[1] * scale, h * scale), Image.NEAREST)


def save_grid(images: torch.Tensor, path: str | os.PathLike, pad: int = 2, captions: Optional[Sequence[str]] = None,
              references: Optional[torch.Tensor] = None, scale: int = 1, cols: Optional[int] = None) -> Path:
    """Tile images F[B,3,H,W] in [-1,1] into a grid PNG with `pad` px white gutters.

    With `captions`, each cell carries its caption underneath (wrapped), so text alignment can be judged
    by eye; with `references` (F[B,3,H,W], e.g. the held-out real image of each caption) each sample has
    its reference beside it. `scale` upscales small images (nearest neighbour) so captions fit.
    """
    arr = to_uint8(images)
    ref = to_uint8(references) if references is not None else None
    b = arr.shape[0]
    if captions is not None and len(captions) < b:
        raise ValueError(f"{b} images but {len(captions)} captions")
    cells = [_cell_image(arr[i], None if ref is None else ref[i], scale, pad) for i in range(b)]
    cw, ch = cells[0].size
    font = ImageFont.load_default()
    line_h = 11  # PIL's default bitmap font is ~6×11 px
    text_lines = [textwrap.wrap(c, max(cw // 6, 8)) for c in captions[:b]] if captions is not None else []
    text_h = line_h * max(map(len, text_lines), default=0) + (2 if text_lines else 0)
    cols = cols or math.ceil(math.sqrt(b))
    rows = math.ceil(b / cols)
    canvas = Image.new("RGB", (cols * (cw + pad) + pad, rows * (ch + text_h + pad) + pad), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for i, cell in enumerate(cells):
        r, c = divmod(i, cols)
        x, y = pad + c * (cw + pad), pad + r * (ch + text_h + pad)
        canvas.paste(cell, (x, y))
        for j, line in enumerate(text_lines[i] if text_lines else []):
            draw.text((x, y + ch + 1 + j * line_h), line, fill=(0, 0, 0), font=font)
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}.png")
    canvas.save(tmp)
    os.replace(tmp, path)  # readers (and wandb) never see a half-written PNG
    return path


def read_eval_results(eval_dir: str | os.PathLike) -> list[dict]:
    """Every `eval/<step>.json`, ascending by step."""
    out = []
    for p in Path(eval_dir).glob("*.json"):
        if p.stem.isdigit():
            out.append(json.loads(p.read_text()))
    return sorted(out, key=lambda r: r["step"])


def plot_curves(run_dir: str | os.PathLike, path: str | os.PathLike,
                train_keys: Sequence[str] = ("loss", "vlb")) -> Path:
    """Training loss (metrics.jsonl) and every numeric eval metric (eval/*.json) against step."""
    import matplotlib
    matplotlib.use("Agg")  # no display on cluster nodes
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    train: dict[int, dict] = {}
    if (run_dir / "metrics.jsonl").exists():
        from vqd_scale.rundir import read_metrics
        train = read_metrics(run_dir)
    evals = read_eval_results(run_dir / "eval")
    metric_names = sorted({k for r in evals for k, v in r.get("metrics", {}).items() if isinstance(v, (int, float))})
    panels = 1 + len(metric_names)
    cols = min(panels, 3)
    rows = math.ceil(panels / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    ax = axes[0][0]
    steps = sorted(train)
    positive = True
    for k in train_keys:
        pts = [(s, train[s][k]) for s in steps if isinstance(train[s].get(k), (int, float))]
        if pts:
            ax.plot(*zip(*pts), label=k)
            positive &= all(v > 0 for _, v in pts)
    ax.set_title("training")
    ax.set_xlabel("step")
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
        if positive:  # losses span decades; a log axis needs every value > 0
            ax.set_yscale("log")
    for i, name in enumerate(metric_names, start=1):
        ax = axes[i // cols][i % cols]
        pts = [(r["step"], r["metrics"][name]) for r in evals if isinstance(r["metrics"].get(name), (int, float))]
        ax.plot(*zip(*pts), marker="o")
        ax.set_title(name)
        ax.set_xlabel("step")
    for j in range(panels, rows * cols):
        axes[j // cols][j % cols].axis("off")
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}.png")
    fig.savefig(tmp, dpi=80)
    plt.close(fig)
    os.replace(tmp, path)
    return path
