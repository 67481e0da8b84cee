"""Offline pre-extraction: img2dataset shards → token shards, one output per input, done-markers, manifest.

Per input shard `NNNNN.tar` the output dir gets `NNNNN.tar` (written as a temp file, then renamed)
and `NNNNN.done.json` (written last: counts written / skipped by reason, and the input's size and
mtime). A rerun skips shards whose marker exists and whose input is unchanged, and redoes
half-written ones and replaced inputs. `manifest.json` aggregates every marker in the dir.
"""
from __future__ import annotations

import dataclasses
import glob
import json
import logging
import os
import signal
import socket
import time
from collections import Counter
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable, Optional

import braceexpand
import numpy as np
import torch

from vqd_scale.data import schema
from vqd_scale.data.inputs import TRUNCATED, UNREADABLE, ShardSamples, expected_samples
from vqd_scale.errors import UserError

log = logging.getLogger(__name__)


@dataclass
class ExtractConfig:
    """What vqd-extract does: inputs, output dir, tokenizer, preprocessing, batching, embeddings."""
    inputs: str = ""  # braceexpand pattern(s) of img2dataset shards, several joined with '::'
    out_dir: str = ""
    tokenizer: str = ""  # tokenizer directory (ImageTokenizer.load)
    source: str = ""  # dataset name recorded per sample, e.g. laion, cc15m; "" = the inputs' folder name
    resolution: Optional[int] = None  # None = the resolution the tokenizer was prepared for
    center_crop: bool = True
    min_size: int = 32  # images whose original shorter side is below this are skipped (tracking pixels)
    batch_size: int = 64
    num_workers: int = 0
    device: str = "cpu"  # cpu | cuda (bf16 autocast on GPU)
    text_tokenizer: str = "ViT-B-32"  # open_clip tokenizer name (CLIP BPE, 77 tokens)
    clip_model: Optional[str] = None  # open_clip model for embeddings ("tiny" or a name); None = no embeddings
    clip_pretrained: Optional[str] = None  # local weights file for clip_model
    keep_uncaptioned: bool = False  # keep images without a caption as image-only records (counted apart)
    task_index: int = 0  # this process handles inputs i with i % num_tasks == task_index (SLURM arrays)
    num_tasks: int = 1
    progress: bool = True
    extra_meta: dict = field(default_factory=dict)


def expand_inputs(pattern: str) -> list[str]:
    """'a/{00000..00009}.tar::b/*.tar'-style patterns → list of paths, order kept."""
    out: list[str] = []
    for part in pattern.split("::"):
        for p in braceexpand.braceexpand(part.strip()):
            # braceexpand leaves '*' alone: a glob was taken as one literal (missing) path, 0 shards, exit 0
            out.extend(sorted(glob.glob(p)) if glob.has_magic(p) and "://" not in p else [p])
    if not out or not pattern.strip():
        raise UserError("no input shards: pass --inputs like 'data/{00000..00099}.tar'")
    return out


def output_name(input_path: str) -> str:
    """Input shard path → output tar name (same stem)."""
    name = Path(input_path).name
    return name if name.endswith(".tar") else name + ".tar"


def text_tokenizer(name: str) -> Callable[[list[str]], torch.Tensor]:
    """open_clip's CLIP BPE tokenizer (bundled vocabulary, no download): list[str] → Long[B,77]."""
    from vqd_scale.compat import import_open_clip

    return import_open_clip().get_tokenizer(name)


def _collate(batch: list[dict]) -> list[dict]:
    return batch


def _die_with_parent(parent: int, _worker_id: int) -> None:
    """Decoding workers of a SIGKILLed vqd-extract exit too (torch's check misses a worker blocked on a full pipe)."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG (Linux)
    except (OSError, AttributeError):
        return  # not Linux: torch's own parent check is all there is
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


def extract_shard(cfg: ExtractConfig, input_path: str, tokenizer, tokenize, embedder=None) -> dict:
    """Tokenise one input shard into out_dir; returns (and writes) its done-marker dict."""
    out_dir = Path(cfg.out_dir)
    final = out_dir / output_name(input_path)
    tmp = final.with_name(f"{final.name}.tmp.{socket.gethostname()}.{os.getpid()}")  # owner: see _is_stale
    t0 = time.time()
    fingerprint = input_fingerprint(input_path)  # before reading: a file replaced meanwhile is redone next run
    skipped: Counter = Counter()
    written = seen = lost = uncaptioned = 0
    device = torch.device(cfg.device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    loader = torch.utils.data.DataLoader(ShardSamples(input_path, cfg.resolution, cfg.center_crop, cfg.min_size,
                                                      cfg.keep_uncaptioned),
                                         batch_size=cfg.batch_size, num_workers=cfg.num_workers,
                                         collate_fn=_collate, worker_init_fn=partial(_die_with_parent, os.getpid()))
    h, w = tokenizer.token_shape(cfg.resolution)
    with schema.tar_writer(tmp) as sink:
        for batch in loader:
            good = []
            for r in batch:
                if r["skip"] is None:
                    good.append(r)
                else:
                    skipped[r["skip"]] += 1
                    if r["skip"] == TRUNCATED:  # lost stays None (unknown) without img2dataset's stats file
                        lost = None if r.get("lost") is None or lost is None else lost + r["lost"]
                        log.error("input shard %s is truncated after %s: %s (samples lost: %s)", input_path,
                                  r["key"], r.get("error"), "unknown" if r.get("lost") is None else r["lost"])
                seen += r["skip"] not in (UNREADABLE, TRUNCATED)  # shard-level events are not samples
            if not good:
                continue
            imgs = torch.from_numpy(np.stack([r["image"] for r in good])).to(device)  # [b,R,R,3] uint8
            imgs = imgs.permute(0, 3, 1, 2).float() / 127.5 - 1  # → [b,3,R,R] in [-1,1]
            captions = [r["caption"] or "" for r in good]  # "" for image-only ones: their text outputs are dropped
            with torch.no_grad(), autocast:
                ids = tokenizer.encode(imgs).cpu().numpy()  # [b,h,w]
                emb = embedder(imgs, captions) if embedder is not None else None
            txt = tokenize(captions).numpy()
            for i, r in enumerate(good):
                meta = {"source": cfg.source, "original_size": r["original_size"],
                        "tokenizer_id": tokenizer.tokenizer_id, "input_shard": Path(input_path).name,
                        "url": r["meta"].get("url"), **cfg.extra_meta}
                if r["caption"] is None:
                    meta["captioned"] = False
                    uncaptioned += 1
                sink.write(schema.encode_record(
                    r["key"], ids[i], txt[i], r["caption"], meta,
                    image_emb=None if emb is None else emb[0][i], text_emb=None if emb is None else emb[1][i]))
                written += 1
    os.replace(tmp, final)
    marker = {"input": str(input_path), "output": final.name, "written": written, "uncaptioned": uncaptioned,
              "skipped": dict(sorted(skipped.items())), "input_samples": seen,
              "expected_samples": expected_samples(input_path), "lost_samples": lost, **fingerprint,
              "tokenizer_id": tokenizer.tokenizer_id, "num_classes": tokenizer.num_classes,
              "token_shape": [h, w], "seconds": round(time.time() - t0, 3),
              "all_invalid": written == 0}
    if written == 0:
        log.error("shard %s: no valid sample (skipped: %s); check the input shard", input_path, dict(skipped))
    schema.write_json_atomic(schema.done_marker_path(final), marker)
    return marker


def write_manifest(cfg: ExtractConfig, tokenizer, inputs: list[str], embed_dim: Optional[int] = None,
                   embedding_model: Optional[dict] = None) -> dict:
    """Aggregate every done-marker of the expected outputs into out_dir/manifest.json (atomic)."""
    out_dir = Path(cfg.out_dir)
    shards, totals, failed, pending, truncated, changed = [], Counter(), [], [], [], []
    missing = [p for p in inputs if not _exists(p)]
    for p in inputs:
        if p in missing:
            continue
        mpath = schema.done_marker_path(out_dir / output_name(p))
        if not mpath.exists():
            pending.append(Path(p).name)
            continue
        m = json.loads(mpath.read_text())
        if input_changed(p, m):  # replaced since its extraction: its output is stale until redone
            pending.append(Path(p).name)
            changed.append(Path(p).name)
            continue
        if m.get("tokenizer_id") != tokenizer.tokenizer_id:
            raise UserError(f"{mpath} was written with tokenizer {m.get('tokenizer_id')}, not "
                             f"{tokenizer.tokenizer_id}; extract into a fresh --out-dir")
        shards.append({"name": m["output"], "count": m["written"]})
        totals["written"] += m["written"]
        if m.get("uncaptioned"):  # image-only records (--keep-uncaptioned), part of written
            shards[-1]["uncaptioned"] = m["uncaptioned"]
            totals["uncaptioned"] += m["uncaptioned"]
        for k, v in m["skipped"].items():
            totals[f"skipped_{k}"] += v
        if m.get("lost_samples"):
            totals["lost_samples"] += m["lost_samples"]
        if m["all_invalid"]:
            failed.append(m["output"])
        if m["skipped"].get(TRUNCATED):
            truncated.append(m["output"])
    h, w = tokenizer.token_shape(cfg.resolution)
    manifest = {
        "format": schema.FORMAT, "tokenizer_id": tokenizer.tokenizer_id, "tokenizer_kind": tokenizer.kind,
        "num_classes": tokenizer.num_classes, "token_shape": [h, w], "resolution": cfg.resolution,
        "center_crop": cfg.center_crop, "text_tokenizer": f"open_clip:{cfg.text_tokenizer}",
        "context_length": 77, "embed_dim": embed_dim, "embedding_model": embedding_model,
        "source": cfg.source, "shards": shards, "totals": dict(sorted(totals.items())),
        "num_failed_shards": len(failed), "failed_shards": failed, "truncated_shards": truncated,
        "missing_inputs": missing, "changed_inputs": changed, "pending_inputs": pending, "complete": not pending,
    }
    schema.write_json_atomic(out_dir / schema.MANIFEST, manifest)
    return manifest


def input_fingerprint(path: str) -> dict:
    """Size and mtime of a local input (recorded in its done-marker); {} for remote inputs."""
    if not Path(path).exists():
        return {}
    st = os.stat(path)
    return {"input_size": st.st_size, "input_mtime_ns": st.st_mtime_ns}


def input_changed(path: str, marker: dict) -> str:
    """How the input differs from when `marker` was written ("" = unchanged, or not recorded)."""
    now = input_fingerprint(path)
    diffs = [f"{k[6:]} {marker[k]} → {v}" for k, v in now.items() if k in marker and marker[k] != v]
    return ", ".join(diffs)


def derive_source(inputs: list[str]) -> str:
    """The inputs' folder name ('/data/laion/{00000..00099}.tar' → 'laion') when they share one."""
    names = {Path(p).parent.name for p in inputs}
    if len(names) != 1 or not min(names):
        raise UserError(f"set --source to the dataset name stored with every record (laion, cc15m, …): "
                         f"the inputs lie in folders named {sorted(names)}, so none can stand for it")
    return names.pop()


def resolve_defaults(cfg: ExtractConfig, tokenizer, inputs: list[str]) -> ExtractConfig:
    """Fill resolution (the tokenizer's) and source (the inputs' folder name) when not given."""
    res = cfg.resolution if cfg.resolution is not None else tokenizer.resolution
    if res is None:
        raise UserError(f"set --resolution: the tokenizer {cfg.tokenizer} records none (a bare diffusers VQModel "
                         f"directory?); pass the image side, e.g. --resolution 256, or prepare the tokenizer with "
                         f"tools/prepare_tokenizer.py, which records it")
    if tokenizer.resolution is not None and res != tokenizer.resolution:
        log.warning("--resolution %d differs from the %d px the tokenizer was prepared for", res, tokenizer.resolution)
    source = cfg.source
    if not source:
        source = derive_source(inputs)
        log.info("source %r (the inputs' folder name; --source sets another)", source)
    return dataclasses.replace(cfg, resolution=int(res), source=source)


def _exists(p: str) -> bool:
    """Local inputs must exist (gaps in img2dataset numbering are common); remote URLs are assumed to."""
    return "://" in p or p.startswith("pipe:") or Path(p).exists()


def _is_stale(tmp: Path, final_name: str) -> bool:
    """True when tmp's writer (this host's pid in its name) is dead; another live run's tmp is kept."""
    host, _, pid = tmp.name[len(final_name) + 4:].lstrip(".").rpartition(".")
    if host and host != socket.gethostname():
        return False  # another node's run (overlapping SLURM tasks): its pid means nothing here
    try:
        os.kill(int(pid), 0)
    except ValueError:
        return True  # not a name we write
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return int(pid) == os.getpid()


def run_extract(cfg: ExtractConfig, embedder=None) -> dict:
    """Extract this task's share of the inputs (skipping finished shards), then rewrite the manifest."""
    from tqdm import tqdm

    from vqd_scale.models.vqvae import ImageTokenizer

    if not cfg.out_dir:
        raise UserError("set --out-dir: where token shards, done-markers and manifest.json go")
    if not 0 <= cfg.task_index < cfg.num_tasks:
        raise UserError(f"task index {cfg.task_index} not in [0, num_tasks={cfg.num_tasks})")
    inputs = expand_inputs(cfg.inputs)
    tokenizer = ImageTokenizer.load(cfg.tokenizer, device=cfg.device)
    cfg = resolve_defaults(cfg, tokenizer, inputs)
    tokenizer.token_shape(cfg.resolution)  # fail fast on a resolution the tokenizer cannot split
    Path(cfg.out_dir).mkdir(parents=True, exist_ok=True)
    tokenize = text_tokenizer(cfg.text_tokenizer)
    mine = [p for i, p in enumerate(inputs) if i % cfg.num_tasks == cfg.task_index]
    missing = [p for p in mine if not _exists(p)]
    for p in missing:
        log.warning("input shard %s does not exist (gap in shard numbering?); recorded in manifest", p)
    if mine and len(missing) == len(mine):  # every input missing is a typo in --inputs, not gaps
        raise UserError(f"none of this task's {len(mine)} input shard(s) exists (first: {mine[0]}); "
                         "check --inputs")
    todo = [p for p in mine if p not in missing]
    for p in tqdm(todo, desc=f"extract task {cfg.task_index}/{cfg.num_tasks}", disable=not cfg.progress):
        final = Path(cfg.out_dir) / output_name(p)
        marker = schema.done_marker_path(final)
        if marker.exists() and final.exists():
            changed = input_changed(p, json.loads(marker.read_text()))
            if not changed:
                continue  # finished by an earlier run
            log.warning("input %s changed since it was extracted (%s): extracting it again", p, changed)
        for tmp in final.parent.glob(final.name + ".tmp*"):  # half-written by a killed run
            if _is_stale(tmp, final.name):
                tmp.unlink(missing_ok=True)
        extract_shard(cfg, p, tokenizer, tokenize, embedder)
    return write_manifest(cfg, tokenizer, inputs, getattr(embedder, "embed_dim", None),
                          getattr(embedder, "description", None))
