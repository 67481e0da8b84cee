"""Mixture initialisation for the shifted prior: streaming k-means over token shards' image embeddings.

Pass 1 fits centres with scikit-learn's `MiniBatchKMeans.partial_fit` on fixed-size chunks (memory
stays O(chunk) however many shards); pass 2 assigns every embedding to its nearest centre and
accumulates count / sum / sum of squares per cluster in float64, giving each component's mean and
per-dim std with respect to the final assignment. Stds are floored (never zero: a zero std made the
released sampler deterministic, issue #12), and clusters with < 2 members get the global std.
Every embedding is L2-normalised first: the clusters live on the unit sphere, like the stored CLIP
embeddings, and the prior scales them into its space z = s·e (`PriorModel.load_clusters`), so the
mixture and the data the prior sees agree whatever the norms in the shards.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from vqd_scale.data import schema
from vqd_scale.errors import MissingInput, UserError

FORMAT = "vqd-prior-clusters/1"
MIN_STD_FRACTION = 1e-2  # floor per-dim stds at this fraction of the global per-dim std


def iter_image_embeddings(shards: str, chunk: int) -> Iterator[np.ndarray]:
    """float32 [≤chunk, E] arrays of `img.emb.npy` over the shards (braceexpand pattern), in order."""
    for (img,) in _iter_records(shards, chunk, (schema.IMAGE_EMB,)):
        yield img


def iter_pairs(shards: str, chunk: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(image [≤chunk, E], text [≤chunk, E]) float32 embedding pairs over the shards, in order."""
    yield from _iter_records(shards, chunk, (schema.IMAGE_EMB, schema.TEXT_EMB))


def shards_have(shards: str, key: str) -> bool:
    """Whether the first captioned record of the shards' first one holds `key` (e.g. schema.TEXT_EMB); image-only
    records (vqd-extract --keep-uncaptioned) have no text members, so they decide nothing."""
    import webdataset as wds

    for rec in wds.WebDataset(_urls(shards)[:1], shardshuffle=False, empty_check=False):
        if schema.TEXT_TOKENS in rec:
            return key in rec
    return False


def _urls(shards: str) -> list[str]:
    import braceexpand

    urls = [u for part in shards.split("::") for u in braceexpand.braceexpand(part)]
    if not urls:
        raise UserError(f"no shards match {shards!r}")
    missing = [u for u in urls if "://" not in u and not u.startswith("pipe:") and not Path(u).exists()]
    if missing:
        raise MissingInput(f"{len(missing)} shard(s) not found, e.g. {missing[0]}; check --shards")
    return urls


def _iter_records(shards: str, chunk: int, keys: tuple[str, ...]) -> Iterator[tuple[np.ndarray, ...]]:
    import webdataset as wds

    urls = _urls(shards)
    bufs: list[list[np.ndarray]] = [[] for _ in keys]
    ds = wds.WebDataset(urls, shardshuffle=False, empty_check=False)
    for rec in ds:
        if schema.TEXT_EMB in keys and schema.TEXT_TOKENS not in rec:
            continue  # an image-only record has no caption to pair with
        for key, buf in zip(keys, bufs):
            if key not in rec:
                raise UserError(f"record {rec.get('__key__')} in {rec.get('__url__')} has no {key}; re-extract the "
                                 "shards with CLIP embeddings (vqd-extract --clip-model stores image and text ones)")
            buf.append(schema.load_npy(rec[key]).astype(np.float32))
        if len(bufs[0]) == chunk:
            yield tuple(np.stack(b) for b in bufs)
            bufs = [[] for _ in keys]
    if bufs[0]:
        yield tuple(np.stack(b) for b in bufs)


def fit_clusters(chunks: Callable[[], Iterable[np.ndarray]], k: int, seed: int = 0,
                 max_samples: Optional[int] = None) -> dict[str, torch.Tensor]:
    """{means [k,E], stds [k,E], counts [k]} from two passes over `chunks()` (each call restarts the stream)."""
    from sklearn.cluster import MiniBatchKMeans

    if k < 1:
        raise UserError(f"k={k}: need at least one component")
    km = MiniBatchKMeans(n_clusters=k, random_state=seed, n_init=3, batch_size=max(1024, 3 * k))
    # the first partial_fit initialises the centres (k-means++ on that batch): give it >= 3k points
    pending: list[np.ndarray] = []
    fitted = False
    for x in _limit(chunks(), max_samples):
        pending.append(x)
        if not fitted and sum(len(p) for p in pending) < 3 * k:
            continue
        km.partial_fit(np.concatenate(pending))
        fitted, pending = True, []
    if pending:
        total = sum(len(p) for p in pending)
        if not fitted and total < k:
            raise UserError(f"only {total} embeddings for k={k} components; use fewer components or more shards")
        km.partial_fit(np.concatenate(pending))
    centres = km.cluster_centers_
    E = centres.shape[1]
    n, s, ss = np.zeros(k, np.int64), np.zeros((k, E)), np.zeros((k, E))
    for x in _limit(chunks(), max_samples):
        if x.shape[1] != E:
            raise UserError(f"embedding width changed from {E} to {x.shape[1]} within the shards")
        lab = km.predict(x)
        n += np.bincount(lab, minlength=k)
        np.add.at(s, lab, x)
        np.add.at(ss, lab, x.astype(np.float64) ** 2)
    total = n.sum()
    g_mean = s.sum(0) / total
    g_std = np.sqrt(np.maximum(ss.sum(0) / total - g_mean ** 2, 0.0))
    floor = np.maximum(MIN_STD_FRACTION * g_std, 1e-6)
    with np.errstate(invalid="ignore", divide="ignore"):
        means = np.where(n[:, None] > 0, s / np.maximum(n, 1)[:, None], centres)
        var = ss / np.maximum(n, 1)[:, None] - means ** 2
    stds = np.where(n[:, None] >= 2, np.sqrt(np.maximum(var, 0.0)), g_std[None])
    stds = np.maximum(stds, floor[None])
    return {"means": torch.from_numpy(means).float(), "stds": torch.from_numpy(stds).float(),
            "counts": torch.from_numpy(n)}


def text_routed_stats(means: torch.Tensor, stds: torch.Tensor, pairs: Iterable[tuple]) -> dict:
    """How the data sits around the component its *caption* picks (argmax cos(text, μ_c)), as the prior uses it.

    pairs: (image [n,E], text [n,E]) chunks (arrays or tensors; normalised here). Returns
    - routed_stds [k,E]: per-dim RMS of (e − μ_c) over the pairs routed to c, the spread the diffusion must
      cover from N(μ_c, ·) (components fewer than 2 pairs pick get the RMS over all pairs);
    - routed_counts [k]; agreement: the fraction of pairs whose caption picks the image's own (nearest) cluster;
    - y_rms: the RMS of (e − μ_c)/σ_c over all pairs with the given `stds`, so the data has RMS y_rms/κ in the
      shifted frame y = (e − μ_c)/(κσ_c), where the noise has RMS 1.
    """
    mu, sd = means.double(), stds.double()
    k, E = mu.shape
    n, ss, yy, agree = torch.zeros(k, dtype=torch.float64), torch.zeros(k, E, dtype=torch.float64), 0.0, 0
    for img, txt in pairs:
        img = F.normalize(torch.as_tensor(img).double(), dim=-1)
        c = (F.normalize(torch.as_tensor(txt).double(), dim=-1) @ F.normalize(mu, dim=-1).T).argmax(1)
        agree += int((torch.cdist(img, mu).argmin(1) == c).sum())
        d2 = (img - mu[c]) ** 2  # [n, E]
        n += torch.bincount(c, minlength=k).double()
        ss.index_add_(0, c, d2)
        yy += (d2 / sd[c] ** 2).sum().item()
    if n.sum() == 0:
        raise UserError("no (image, text) embedding pairs to route; check the shards")
    rms = (ss / n.clamp(min=1)[:, None]).sqrt()
    routed = torch.where(n[:, None] >= 2, rms, (ss.sum(0) / n.sum()).sqrt()[None]).clamp(min=1e-6)
    return {"routed_stds": routed.float(), "routed_counts": n.long(), "agreement": agree / n.sum().item(),
            "y_rms": torch.tensor((yy / (n.sum().item() * E)) ** 0.5)}


def _limit(chunks: Iterable[np.ndarray], max_samples: Optional[int]) -> Iterator[np.ndarray]:
    left = max_samples
    for x in chunks:
        x = np.asarray(x, dtype=np.float32)  # one dtype for fit and predict (sklearn's Cython needs it)
        x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)  # unit sphere, as the prior sees it
        if left is not None:
            if left <= 0:
                return
            x = x[:left]
            left -= len(x)
        yield x


def manifest_identity(manifest: Optional[str]) -> dict[str, str]:
    """What identifies the data the clusters came from: the manifest's sha256 and tokenizer id."""
    if manifest is None:
        return {}
    p = Path(manifest)
    p = p / schema.MANIFEST if p.is_dir() else p
    m = schema.read_manifest(p)
    return {"manifest": str(p), "manifest_sha256": hashlib.sha256(p.read_bytes()).hexdigest(),
            "tokenizer_id": str(m.get("tokenizer_id", ""))}


def save_clusters(path: str | Path, clusters: dict[str, torch.Tensor], metadata: dict) -> None:
    """Write means/stds/counts to .safetensors; metadata values are stored as strings."""
    meta = {"format": FORMAT, "k": str(len(clusters["means"])), "embed_dim": str(clusters["means"].shape[1])}
    meta.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()})
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file({k: clusters[k].contiguous() for k in ("means", "stds", "counts")}, str(path), metadata=meta)


def load_clusters(path: str | Path) -> dict:
    """{means, stds, counts, metadata} from a file written by `save_clusters`; checks the format."""
    if not Path(path).exists():
        raise MissingInput(f"clusters file {path} not found; fit it with tools/fit_prior_clusters.py "
                                "or unset shifted.clusters")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") != FORMAT:
        raise UserError(f"{path}: format {meta.get('format')!r} is not {FORMAT!r}; refit with tools/fit_prior_clusters.py")
    out = dict(load_file(str(path)))
    out["metadata"] = meta
    return out
