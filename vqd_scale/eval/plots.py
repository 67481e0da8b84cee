"""Eval figures: the PNG sample grid of a checkpoint and the loss/metric-vs-step curves (matplotlib Agg)."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """F[B,3,H,W] in [-1,1] → uint8 [B,H,W,3]."""
    x = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).numpy()  # [B,3,H,W] → [B,H,W,3]


def save_grid(images: torch.Tensor, path: str | os.PathLike, pad: int = 2) -> Path:
    """Tile images F[B,3,H,W] in [-1,1] into a near-square grid PNG with `pad` px white gutters."""
    arr = to_uint8(images)
    b, h, w, _ = arr.shape
    cols = math.ceil(math.sqrt(b))
    rows = math.ceil(b / cols)
    canvas = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, 3), 255, np.uint8)
    for i in range(b):
        r, c = divmod(i, cols)
        y, x = pad + r * (h + pad), pad + c * (w + pad)
        canvas[y:y + h, x:x + w] = arr[i]
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}.png")
    Image.fromarray(canvas).save(tmp)
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
        from vqd_scale.train.metrics import read_metrics
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
