"""Evaluation metrics: Fréchet distance, image feature extractors (CLIP, Inception), CLIP score,
attribute accuracy on synthetic data, and the prior's cosine metrics.

The Fréchet maths is pytorch-fid's (scipy `sqrtm` with the ε-offset fallback), so numbers are
comparable with what users already report. Feature extractors load weights from local files only;
a named model without local weights is refused because random features make FID meaningless.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import scipy.linalg
import torch
import torch.nn.functional as F

from vqd_scale.compat import import_open_clip
from vqd_scale.errors import MissingInput, UserError

# Tiny CLIP for tests and the CPU demo: the real open_clip architecture, random init.
TINY_CLIP = dict(embed_dim=16,
                 vision_cfg=dict(image_size=32, layers=1, width=32, patch_size=8, head_width=16),
                 text_cfg=dict(context_length=77, vocab_size=49408, width=32, heads=2, layers=1))


# ---------------------------------------------------------------------------------------------
# Fréchet distance
# ---------------------------------------------------------------------------------------------

def gaussian_stats(features: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Mean [D] and unbiased covariance [D,D] (float64) of features [N,D], as pytorch-fid computes them."""
    f = features.detach().cpu().double().numpy() if isinstance(features, torch.Tensor) else np.asarray(features, np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise UserError(f"need features of shape [N>=2, D] for Fréchet statistics, got {f.shape}; "
                         "raise eval.num_samples")
    if not np.isfinite(f).all():
        raise UserError("features contain NaN/inf; the model or the decoder produced non-finite images")
    return f.mean(0), np.atleast_2d(np.cov(f, rowvar=False))


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     eps: float = 1e-6) -> float:
    """d² = |μ1−μ2|² + tr(Σ1) + tr(Σ2) − 2·tr((Σ1Σ2)^½), following pytorch-fid."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise UserError(f"Fréchet statistics disagree in shape: mu {mu1.shape} vs {mu2.shape}, "
                         f"sigma {sigma1.shape} vs {sigma2.shape}; were they made with the same feature extractor?")
    diff = mu1 - mu2
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        # Singular product (fewer samples than dimensions): pytorch-fid's fallback, add ε to the diagonals.
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        # Numerical noise makes tiny imaginary parts; a large one means the statistics are broken.
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise UserError(f"Fréchet distance: sqrtm has imaginary component {np.abs(covmean.imag).max():.3g}; "
                             "covariances are not positive semi-definite")
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def fid_from_features(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor) -> float:
    """Fréchet distance between two feature sets [N,D] and [M,D]."""
    return frechet_distance(*gaussian_stats(a), *gaussian_stats(b))


def save_stats(path: str | os.PathLike, mu: np.ndarray, sigma: np.ndarray) -> None:
    """Write statistics as pytorch-fid's .npz (`mu`, `sigma`)."""
    np.savez(path, mu=mu, sigma=sigma)


def load_stats(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Read a pytorch-fid / clean-fid style .npz with `mu` and `sigma`."""
    if not Path(path).exists():
        raise MissingInput(f"reference statistics {path} not found (eval.reference_stats)")
    with np.load(path) as z:
        if "mu" not in z or "sigma" not in z:
            raise UserError(f"{path}: needs arrays 'mu' and 'sigma' (pytorch-fid format), has {list(z.keys())}")
        return z["mu"], z["sigma"]


# ---------------------------------------------------------------------------------------------
# Feature extractors: images F[B,3,H,W] in [-1,1] → features F[B,D]
# ---------------------------------------------------------------------------------------------

class ClipFeatures(torch.nn.Module):
    """open_clip image and text towers: L2-normalised embeddings for FID features and CLIP score."""

    def __init__(self, model_name: str, weights: Optional[str]):
        super().__init__()
        oc = import_open_clip()
        if model_name == "tiny":
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)  # the same random tiny CLIP in every process: comparable numbers
                self.model = oc.CLIP(**TINY_CLIP)
            if weights:
                self.model.load_state_dict(_load_state_dict(weights))
            self.tokenizer = oc.get_tokenizer("ViT-B-32")  # same BPE vocab, offline
        else:
            if not weights and not model_name.startswith("local-dir:"):
                raise UserError(f"eval.clip_weights is not set for CLIP model {model_name!r}: give a local "
                                 "weights file (hub tags are not downloaded at run time); random features "
                                 "would make FID and CLIP score meaningless. Use clip_model=tiny only for tests.")
            if weights and not Path(weights).exists():
                raise MissingInput(f"eval.clip_weights={weights} does not exist")
            self.model = oc.create_model(model_name, pretrained=weights or None)
            self.tokenizer = oc.get_tokenizer(model_name)
        self.model.eval().requires_grad_(False)
        self.image_size = tuple(self.model.visual.image_size)
        cfg = getattr(self.model.visual, "preprocess_cfg", None) or {}
        mean = cfg.get("mean", oc.OPENAI_DATASET_MEAN)
        std = cfg.get("std", oc.OPENAI_DATASET_STD)
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    @torch.inference_mode()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Images [B,3,H,W] in [-1,1] → normalised image embeddings [B,E]."""
        x = (images.float().clamp(-1, 1) + 1) / 2
        x = F.interpolate(x, size=self.image_size, mode="bicubic", align_corners=False, antialias=True)
        x = (x - self.mean) / self.std
        return F.normalize(self.model.encode_image(x), dim=-1)

    @torch.inference_mode()
    def text(self, captions: Sequence[str]) -> torch.Tensor:
        """Captions → normalised text embeddings [B,E]."""
        tokens = self.tokenizer(list(captions)).to(self.mean.device)
        return F.normalize(self.model.encode_text(tokens), dim=-1)


class InceptionFeatures(torch.nn.Module):
    """pytorch-fid's FID Inception-v3 (2048-d pool features), built from a local weights file only."""

    WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"  # the file name pytorch-fid downloads

    def __init__(self, weights: Optional[str]):
        super().__init__()
        if not weights or not Path(weights).is_file():
            raise UserError(f"feature_extractor=inception needs eval.feature_weights = a local copy of "
                             f"pytorch-fid's {self.WEIGHTS_NAME} (got {weights!r}); nothing is downloaded "
                             "at run time. Or use feature_extractor=clip.")
        import_open_clip()  # patches torchvision's C-op schemas on CPU torch before pytorch_fid imports it
        try:
            from pytorch_fid.inception import InceptionV3
        except ImportError:
            raise ImportError("feature_extractor=inception needs pytorch-fid: "
                              "pip install -c constraints.txt pytorch-fid") from None
        # pytorch-fid loads its weights through torch.hub, which uses a file already in the hub cache
        # instead of downloading: point a private hub dir at the local file for the construction.
        old = torch.hub.get_dir()
        with tempfile.TemporaryDirectory() as hub:
            os.makedirs(os.path.join(hub, "checkpoints"))
            os.symlink(os.path.abspath(weights), os.path.join(hub, "checkpoints", self.WEIGHTS_NAME))
            torch.hub.set_dir(hub)
            try:
                self.net = InceptionV3([InceptionV3.BLOCK_INDEX_BY_DIM[2048]], resize_input=True,
                                       normalize_input=True, use_fid_inception=True)
            finally:
                torch.hub.set_dir(old)
        self.net.eval().requires_grad_(False)

    @torch.inference_mode()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Images [B,3,H,W] in [-1,1] → pool features [B,2048]."""
        x = (images.float().clamp(-1, 1) + 1) / 2  # pytorch-fid expects [0,1] and rescales itself
        return self.net(x)[0].flatten(1)  # [B,2048,1,1] → [B,2048]


def _load_state_dict(path: str) -> dict:
    if str(path).endswith(".safetensors"):
        from safetensors.torch import load_file
        return load_file(path)
    return torch.load(path, map_location="cpu", weights_only=True)


# Explicit registry: name → constructor(clip_model, clip_weights, feature_weights).
FEATURE_EXTRACTORS: dict[str, Callable[[str, Optional[str], Optional[str]], torch.nn.Module]] = {
    "clip": lambda clip_model, clip_weights, feature_weights: ClipFeatures(clip_model, clip_weights),
    "inception": lambda clip_model, clip_weights, feature_weights: InceptionFeatures(feature_weights),
}


# ---------------------------------------------------------------------------------------------
# CLIP score, attribute accuracy, prior cosines
# ---------------------------------------------------------------------------------------------

def clip_score(image_emb: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
    """Per-pair CLIP score [B]: 100·max(cos(image, text), 0), as torchmetrics / Hessel et al. define it."""
    if image_emb.shape != text_emb.shape:
        raise UserError(f"CLIP score needs paired embeddings of equal shape, got {tuple(image_emb.shape)} "
                         f"and {tuple(text_emb.shape)}")
    return 100 * F.cosine_similarity(image_emb.float(), text_emb.float(), dim=-1).clamp(min=0)


ATTRIBUTE_KEYS = ("objects", "color", "shape", "position", "count", "all")


def is_random_clip(clip_model: str, clip_weights: Optional[str]) -> bool:
    """The `tiny` tower without weights: random features, so FID / CLIP score on it measure nothing."""
    return clip_model == "tiny" and not clip_weights


def synthetic_captions(captions: Sequence[str]) -> bool:
    """True when every caption is one tools/make_synthetic.py writes: attribute accuracy parses only those."""
    from vqd_scale.data.synthetic import caption_attributes, caption_of

    return bool(captions) and all(caption_of(caption_attributes(c)["objects"]) == c.strip() for c in captions)


def metric_notes(metrics: Sequence[str], captions: Sequence[str], feature_extractor: str, clip_model: str,
                 clip_weights: Optional[str]) -> dict[str, str]:
    """Requested metrics that would print a number that means nothing → why (they are not reported as metrics)."""
    notes = {}
    if "attributes" in metrics and not synthetic_captions(captions):
        notes["attributes"] = ("not applicable: the held-out captions are not synthetic ones (attribute accuracy "
                               "parses tools/make_synthetic.py captions); drop 'attributes' from eval.metrics")
    if is_random_clip(clip_model, clip_weights):
        why = ("not meaningful: computed with the random `tiny` CLIP tower (eval.clip_model=tiny without "
               "eval.clip_weights), which exercises the pipeline only; set eval.clip_model/clip_weights to real CLIP")
        for name in ("clip_score",) + (("fid",) if feature_extractor == "clip" else ()):
            if name in metrics:
                notes[name] = why
    return notes


def attribute_hits(captions: Sequence[str], images: torch.Tensor) -> torch.Tensor:
    """Per-sample rows F[B,6] = (caption objects, colour hits, shape hits, position hits, count right,
    all right), from the synthetic-data heuristics; rows from several ranks add up (`attribute_summary`)."""
    from vqd_scale.data.synthetic import attribute_accuracy, caption_attributes

    if len(captions) != len(images):
        raise UserError(f"{len(captions)} captions for {len(images)} images")
    rows = []
    for caption, image in zip(captions, images):
        n = len(caption_attributes(caption)["objects"])
        acc = attribute_accuracy([caption], [image])  # fractions over this caption's objects
        rows.append([n, acc["color"] * n, acc["shape"] * n, acc["position"] * n, acc["count"], acc["all"]])
    return torch.tensor(rows, dtype=torch.float64).reshape(-1, len(ATTRIBUTE_KEYS))


def attribute_summary(rows: torch.Tensor) -> dict[str, float]:
    """Accuracy per attribute over all caption objects; `attr_count`/`attr_all` over images."""
    tot = rows.sum(0)
    n_obj, n_img = max(float(tot[0]), 1.0), max(rows.shape[0], 1)
    out = {f"attr_{k}": float(tot[i]) / n_obj for i, k in enumerate(ATTRIBUTE_KEYS[1:4], start=1)}
    out["attr_count"] = float(tot[4]) / n_img
    out["attr_all"] = float(tot[5]) / n_img
    return out


PRIOR_KEYS = ("sim_pred_image", "sim_pred_text", "sim_unrelated_image", "sim_text_image")


def prior_cosine_rows(pred_image_emb: torch.Tensor, image_emb: torch.Tensor, text_emb: torch.Tensor,
                      pred_unrelated_emb: torch.Tensor) -> torch.Tensor:
    """DALLE2-pytorch `report_cosine_sims`, per sample F[B,4] in PRIOR_KEYS order: predicted image
    embedding vs the true image / the text, a prediction from an unrelated caption vs the true image
    (a control that should stay lower), and the text-image baseline."""
    cos = lambda a, b: F.cosine_similarity(a.float(), b.float(), dim=-1)  # noqa: E731
    return torch.stack([cos(pred_image_emb, image_emb), cos(pred_image_emb, text_emb),
                        cos(pred_unrelated_emb, image_emb), cos(text_emb, image_emb)], dim=1)
