"""Prepare a pretrained VQ model for a dataset: fit the codebook pruning map on the user's own shards.

VQ-Diffusion keeps only the codes a sample of the training images actually uses (2886 of the
OpenImages VQGAN's): the diffusion then never spends probability on dead codes. Every tenth image,
up to `heldout` of them, is set aside to report what pruning costs on images it was not fitted on
(reconstruction error with the full and the pruned codebook, tokens whose nearest code was pruned).
"""
from __future__ import annotations

import math
from typing import Iterable, Iterator

import numpy as np
import torch

from vqd_scale.data.extract import expand_inputs
from vqd_scale.data.inputs import decode_sample, iter_raw_samples
from vqd_scale.errors import UserError


def shard_images(inputs: str, resolution: int, center_crop: bool = True, min_size: int = 32,
                 max_images: int = 2000) -> Iterator[np.ndarray]:
    """Up to max_images decodable images uint8 [R,R,3] from img2dataset shards, as vqd-extract preprocesses them."""
    n = 0
    for path in expand_inputs(inputs):
        for key, group, reason in iter_raw_samples(path):
            if reason is not None:
                continue
            s = decode_sample(key, group, resolution, center_crop, min_size)
            if s["skip"] is None:
                yield s["image"]
                n += 1
                if n == max_images:
                    return


def _to_tensor(images: list[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1  # [b,R,R,3] u8 → [b,3,R,R]


def _psnr(mse: float) -> float:
    return 10 * math.log10(4.0 / mse) if mse > 0 else float("inf")  # images span [-1, 1]: peak-to-peak 2


@torch.no_grad()
def fit_pruning(tok, images: Iterable[np.ndarray], heldout: int = 64, min_count: int = 1,
                batch_size: int = 16) -> dict:
    """Keep the codes used ≥ min_count times by the fitting images (all but every tenth, up to `heldout`
    of which are held out); returns the report."""
    n_codes = tok.codebook().shape[0]
    counts = torch.zeros(n_codes, dtype=torch.long)
    held: list[np.ndarray] = []
    buf: list[np.ndarray] = []
    n_fit = 0

    def count(batch: list[np.ndarray]) -> None:
        nonlocal counts, n_fit
        counts += torch.bincount(tok.encode_full(_to_tensor(batch)).flatten().cpu(), minlength=n_codes)
        n_fit += len(batch)

    for i, im in enumerate(images):
        if i % 10 == 0 and len(held) < heldout:
            held.append(im)
            continue
        buf.append(im)
        if len(buf) == batch_size:
            count(buf)
            buf = []
    if buf:
        count(buf)
    if n_fit == 0:
        raise UserError("no image to fit the pruning map on: the shards gave none that decodes (check --shards, "
                         "--min-image-size)")
    keep = torch.nonzero(counts >= min_count).flatten()
    if keep.numel() == 0:
        raise UserError(f"no code is used {min_count} times; lower --min-count")
    full_err = tok_err = pruned_frac = None  # no held-out images: nothing to report
    if held:
        h = _to_tensor(held)
        full_ids = tok.encode_full(h)
        full_err = float(((tok.render(full_ids).clamp(-1, 1).cpu() - h) ** 2).mean())
        pruned_frac = float((~torch.isin(full_ids.cpu(), keep)).float().mean())
    tok.fit_pruning_map(keep)
    if held:
        tok_err = float(((tok.decode(tok.encode(h)).cpu() - h) ** 2).mean())
    top = counts.sort(descending=True).values
    tokens = int(counts.sum())
    return {"codes_total": n_codes, "codes_kept": int(keep.numel()), "min_count": min_count,
            "fit_images": n_fit, "fit_tokens": tokens, "heldout_images": len(held),
            "top10pct_codes_token_share": float(top[: max(1, n_codes // 10)].sum()) / max(tokens, 1),
            "recon_mse_full": full_err, "recon_mse_pruned": tok_err,
            "psnr_full": None if full_err is None else _psnr(full_err),
            "psnr_pruned": None if tok_err is None else _psnr(tok_err),
            "heldout_tokens_pruned": pruned_frac, "tokenizer_id": tok.tokenizer_id}
