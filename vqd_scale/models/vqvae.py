"""Image tokenizers (diffusers VQModel, patch k-means) with the codebook pruning map they own.

Both kinds share one interface: `encode(images F[B,3,H,W] in [-1,1]) -> Long[B,h,w]` compact ids,
`decode(ids) -> F[B,3,H,W]`, `num_classes` (K after pruning), `tokenizer_id` (kind + hash of the
weights, the pruning map and the few settings that change the computation without changing a
weight's shape; never the name or folder, so a copied directory keeps its id). Pruning is applied by quantising against the kept codebook rows
only, so an encoded id is always a valid compact id (the released VQ-Diffusion crash came from
ids outside the map). `ImageTokenizer.load(dir)` picks the kind from `tokenizer.json`.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from vqd_scale.errors import MissingInput, UserError

TOKENIZER_JSON = "tokenizer.json"
PRUNING_FILE = "pruning.safetensors"


class ImageTokenizer:
    """Base: pruning map, ids, save/load; subclasses provide features, codebook and rendering."""

    kind = "base"

    def __init__(self, name: str, keep: Optional[torch.Tensor] = None):
        self.name = name  # a label for people; not part of the id
        self.resolution: Optional[int] = None  # image side it was prepared for (extraction's default)
        n = self.codebook().shape[0]
        self.keep = torch.arange(n) if keep is None else torch.as_tensor(keep, dtype=torch.long).cpu()
        self._id: Optional[str] = None
        self._check_keep()

    # --- subclass hooks -------------------------------------------------------------------
    def codebook(self) -> torch.Tensor:
        """Full codebook [n_codes, D] in the space `features` lives in."""
        raise NotImplementedError

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """images F[B,3,H,W] → per-token features F[B,h,w,D]."""
        raise NotImplementedError

    def render(self, full_ids: torch.Tensor) -> torch.Tensor:
        """Full (unpruned) ids Long[B,h,w] → images F[B,3,H,W] in [-1,1]."""
        raise NotImplementedError

    def config(self) -> dict:
        """Kind-specific JSON config (written to tokenizer.json)."""
        raise NotImplementedError

    def identity_config(self) -> dict:
        """Settings that change encode/decode but no weight shape (hashed into tokenizer_id with the weights)."""
        raise NotImplementedError

    def weight_tensors(self) -> dict[str, torch.Tensor]:
        """Tensors that define the tokenizer, hashed into tokenizer_id."""
        raise NotImplementedError

    def _save_weights(self, path: Path) -> None:
        raise NotImplementedError

    # --- shared ---------------------------------------------------------------------------
    def _check_keep(self) -> None:
        n = self.codebook().shape[0]
        k = self.keep
        if k.ndim != 1 or k.numel() == 0 or int(k.min()) < 0 or int(k.max()) >= n or k.unique().numel() != k.numel():
            raise UserError(f"pruning map of tokenizer {self.name!r} must list distinct code ids in [0, {n}); "
                             f"refit it with fit_pruning_map()")
        if k.numel() > np.iinfo(np.int16).max:
            raise UserError(f"{k.numel()} kept codes do not fit the int16 token record; prune the codebook")

    @property
    def num_classes(self) -> int:
        """K: number of compact (kept) codes; the mask id is K."""
        return int(self.keep.numel())

    @property
    def full_to_compact(self) -> torch.Tensor:
        """LongTensor[n_codes]: compact id of each full id, −1 where pruned."""
        m = torch.full((self.codebook().shape[0],), -1, dtype=torch.long)
        m[self.keep] = torch.arange(self.keep.numel())
        return m

    @property
    def tokenizer_id(self) -> str:
        """kind + hash of weights, pruning map and identity_config (recorded in every shard and manifest)."""
        if self._id is None:
            h = hashlib.sha256(json.dumps({"kind": self.kind, **self.identity_config()}, sort_keys=True).encode())
            for k, v in sorted(self.weight_tensors().items()):
                h.update(f"{k}{tuple(v.shape)}".encode())
                h.update(v.detach().cpu().float().contiguous().numpy().tobytes())
            h.update(self.keep.numpy().astype(np.int64).tobytes())
            self._id = f"{self.kind}-{h.hexdigest()[:12]}"
        return self._id

    def downsample(self) -> int:
        """Pixels per token side."""
        raise NotImplementedError

    def token_shape(self, resolution: int) -> tuple[int, int]:
        """Token grid (h, w) for square images of this resolution."""
        f = self.downsample()
        if resolution % f:
            raise UserError(f"resolution {resolution} is not a multiple of the tokenizer's factor {f}")
        return resolution // f, resolution // f

    def _check_images(self, images: torch.Tensor) -> None:
        f = self.downsample()
        if images.ndim != 4 or images.shape[1] != 3 or images.shape[2] % f or images.shape[3] % f:
            raise UserError(f"images must be F[B,3,H,W] with H, W multiples of {f}; got {tuple(images.shape)}")

    @torch.no_grad()
    def encode_full(self, images: torch.Tensor) -> torch.Tensor:
        """Unpruned nearest-code ids Long[B,h,w] (for fitting the pruning map)."""
        self._check_images(images)
        return _nearest(self.features(images), self.codebook())

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """images F[B,3,H,W] in [-1,1] → compact ids Long[B,h,w], nearest among kept codes only."""
        self._check_images(images)
        cb = self.codebook()
        return _nearest(self.features(images), cb[self.keep.to(cb.device)])

    @torch.no_grad()
    def decode(self, ids: torch.Tensor) -> torch.Tensor:
        """Compact ids Long[B,h,w] → images F[B,3,H,W] in [-1,1]."""
        ids = torch.as_tensor(ids)
        if ids.ndim != 3:
            raise UserError(f"ids must be Long[B,h,w]; got shape {tuple(ids.shape)}")
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.num_classes):
            raise UserError(f"token ids must be in [0, {self.num_classes}) for tokenizer {self.tokenizer_id}; "
                             f"got [{int(ids.min())}, {int(ids.max())}] (mask tokens left, or another tokenizer?)")
        keep = self.keep.to(ids.device)
        return self.render(keep[ids.long()]).clamp(-1, 1)

    def fit_pruning_map(self, ids_seen: Any) -> "ImageTokenizer":
        """Keep exactly the full ids that occur in ids_seen (any shape); returns self."""
        seen = torch.as_tensor(np.asarray(ids_seen)).long().flatten().unique().sort().values
        self.keep = seen.cpu()
        self._id = None
        self._check_keep()
        return self

    def save(self, path: str | Path) -> Path:
        """Write tokenizer.json, the pruning map and the weights into a directory."""
        p = Path(path)
        p.mkdir(parents=True, exist_ok=True)
        self._save_weights(p)
        save_file({"keep": self.keep.contiguous()}, str(p / PRUNING_FILE))
        meta = {"kind": self.kind, "name": self.name, "tokenizer_id": self.tokenizer_id,
                "resolution": self.resolution, **self.config()}
        (p / TOKENIZER_JSON).write_text(json.dumps(meta, indent=1, sort_keys=True))
        return p

    @staticmethod
    def load(path: str | Path, device: str | torch.device = "cpu") -> "ImageTokenizer":
        """Load any registered kind from a directory (a bare diffusers VQModel dir works too: no pruning)."""
        p = Path(path)
        meta_file = p / TOKENIZER_JSON
        if not meta_file.exists():
            if (p / "config.json").exists():  # plain diffusers VQModel directory
                return VQModelTokenizer.from_diffusers(p, name=p.name).to(device)
            raise MissingInput(f"{meta_file} not found: {p} is not a tokenizer directory "
                                    f"(make one with tools/fit_tokenizer.py or ImageTokenizer.save)")
        meta = json.loads(meta_file.read_text())
        kind = meta.get("kind")
        if kind not in TOKENIZERS:
            raise UserError(f"{meta_file}: unknown tokenizer kind {kind!r}; known: {sorted(TOKENIZERS)}")
        tok = TOKENIZERS[kind]._load(p, meta)
        tok.keep = load_file(str(p / PRUNING_FILE))["keep"].long() if (p / PRUNING_FILE).exists() else tok.keep
        tok._check_keep()
        tok.resolution = meta.get("resolution")
        saved = meta.get("tokenizer_id")
        if saved and saved != tok.tokenizer_id:
            raise UserError(f"{p}: weights/pruning map hash to {tok.tokenizer_id} but tokenizer.json says {saved}; "
                             f"the directory was modified (restore the original files), or it was saved by an "
                             f"older vqd_scale whose ids included the name (re-save it with ImageTokenizer.save "
                             f"and re-extract its token shards)")
        return tok.to(device)

    def to(self, device: str | torch.device) -> "ImageTokenizer":
        """Move weights to device; returns self."""
        raise NotImplementedError


def _nearest(feats: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """feats F[B,h,w,D], codebook F[n,D] → argmin-distance ids Long[B,h,w]."""
    b, h, w, d = feats.shape
    flat = feats.reshape(b * h * w, d).float()  # [B*h*w, D]
    return torch.cdist(flat, codebook.float()).argmin(dim=1).reshape(b, h, w)


def _import_vqmodel():
    from vqd_scale.compat import import_diffusers

    return import_diffusers().VQModel


class VQModelTokenizer(ImageTokenizer):
    """A diffusers VQModel (VQGAN) as tokenizer: encoder latents → nearest code; codes → decoder."""

    kind = "vqmodel"

    def __init__(self, model, name: str = "vqmodel", keep: Optional[torch.Tensor] = None):
        self.model = model.eval().requires_grad_(False)
        super().__init__(name, keep)

    @classmethod
    def from_diffusers(cls, path: str | Path, name: Optional[str] = None) -> "VQModelTokenizer":
        """Wrap a local diffusers-format VQModel directory (never a hub id) with an identity map."""
        p = Path(path)
        if not (p / "config.json").exists():
            raise MissingInput(f"{p} has no config.json; pass a local diffusers VQModel directory")
        return cls(_import_vqmodel().from_pretrained(str(p)), name=name or p.name)

    @classmethod
    def _load(cls, p: Path, meta: dict) -> "VQModelTokenizer":
        return cls(_import_vqmodel().from_pretrained(str(p / "model")), name=meta["name"])

    def _save_weights(self, path: Path) -> None:
        self.model.save_pretrained(str(path / "model"))

    def codebook(self) -> torch.Tensor:
        return self.model.quantize.embedding.weight

    def features(self, images: torch.Tensor) -> torch.Tensor:
        lat = self.model.encode(images.to(self.codebook().device)).latents  # [B, D, h, w] after quant_conv
        return lat.permute(0, 2, 3, 1)

    def render(self, full_ids: torch.Tensor) -> torch.Tensor:
        dev = self.codebook().device
        quant = self.model.quantize.embedding(full_ids.to(dev)).permute(0, 3, 1, 2)  # [B,h,w,D] → [B,D,h,w]
        return self.model.decode(quant, force_not_quantize=True).sample.float()

    def downsample(self) -> int:
        return 2 ** (len(self.model.config.block_out_channels) - 1)

    def config(self) -> dict:
        return {"model_config": {k: v for k, v in dict(self.model.config).items() if not k.startswith("_")}}

    def identity_config(self) -> dict:
        c = self.model.config  # the rest of the config is either shape (in the weights) or unused here
        return {k: c.get(k) for k in ("act_fn", "norm_num_groups", "norm_type")}

    def weight_tensors(self) -> dict[str, torch.Tensor]:
        return dict(self.model.state_dict())

    def to(self, device):
        self.model.to(device)
        return self


class KMeansTokenizer(ImageTokenizer):
    """Patch k-means codebook: token = nearest centroid of a p×p RGB patch; decode pastes centroids."""

    kind = "kmeans"

    def __init__(self, centroids: torch.Tensor, patch: int, name: str = "kmeans",
                 keep: Optional[torch.Tensor] = None):
        if centroids.ndim != 2 or centroids.shape[1] != 3 * patch * patch:
            raise UserError(f"centroids must be [n, 3*{patch}*{patch}]; got {tuple(centroids.shape)}")
        self.centroids = centroids.float()
        self.patch = patch
        super().__init__(name, keep)

    @classmethod
    def fit(cls, images: torch.Tensor, patch: int = 8, num_codes: int = 256, seed: int = 0,
            name: str = "kmeans", batch_size: int = 4096) -> "KMeansTokenizer":
        """Fit MiniBatchKMeans on all p×p patches of images F[N,3,H,W] in [-1,1], then prune unused codes."""
        from sklearn.cluster import MiniBatchKMeans

        patches = _patchify(images.float(), patch).reshape(-1, 3 * patch * patch).numpy()  # [N*h*w, 3p²]
        # drop near-duplicates (flat background dominates): otherwise most centroids sit on one colour
        patches, counts = np.unique(np.round(patches * 32) / 32, axis=0, return_counts=True)
        if len(patches) < num_codes:
            raise UserError(f"{len(patches)} patches cannot fit {num_codes} codes; give more images")
        km = MiniBatchKMeans(n_clusters=num_codes, random_state=seed, batch_size=batch_size, n_init=3,
                             max_iter=100).fit(patches)
        # Then each centroid = the count-weighted mean of its members: unweighted, the single background
        # patch shares a cluster with rarer "background + an edge pixel" patches and decodes with a dot.
        sums = np.zeros_like(km.cluster_centers_)
        np.add.at(sums, km.labels_, patches * counts[:, None])
        weight = np.bincount(km.labels_, weights=counts, minlength=num_codes)[:, None]
        centers = np.where(weight > 0, sums / np.maximum(weight, 1), km.cluster_centers_)
        tok = cls(torch.from_numpy(centers).float(), patch, name=name)
        return tok.fit_pruning_map(tok.encode_full(images))

    @classmethod
    def _load(cls, p: Path, meta: dict) -> "KMeansTokenizer":
        return cls(load_file(str(p / "centroids.safetensors"))["centroids"], int(meta["patch"]), name=meta["name"])

    def _save_weights(self, path: Path) -> None:
        save_file({"centroids": self.centroids.cpu().contiguous()}, str(path / "centroids.safetensors"))

    def codebook(self) -> torch.Tensor:
        return self.centroids

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return _patchify(images.to(self.centroids.device).float(), self.patch)

    def render(self, full_ids: torch.Tensor) -> torch.Tensor:
        b, h, w = full_ids.shape
        p = self.patch
        x = self.centroids[full_ids.to(self.centroids.device)].reshape(b, h, w, 3, p, p)
        return x.permute(0, 3, 1, 4, 2, 5).reshape(b, 3, h * p, w * p)  # [B,h,w,3,p,p] → [B,3,h·p,w·p]

    def downsample(self) -> int:
        return self.patch

    def config(self) -> dict:
        return {"patch": self.patch}

    def identity_config(self) -> dict:
        return {"patch": self.patch}

    def weight_tensors(self) -> dict[str, torch.Tensor]:
        return {"centroids": self.centroids}

    def to(self, device):
        self.centroids = self.centroids.to(device)
        return self


def _patchify(images: torch.Tensor, p: int) -> torch.Tensor:
    """F[B,3,H,W] → F[B,H/p,W/p,3·p·p] (channel-major within a patch, matching render())."""
    b, c, hh, ww = images.shape
    x = images.reshape(b, c, hh // p, p, ww // p, p)  # [B,3,h,p,w,p]
    return x.permute(0, 2, 4, 1, 3, 5).reshape(b, hh // p, ww // p, c * p * p)


# explicit registry: tokenizer.json "kind" → class
TOKENIZERS: dict[str, type[ImageTokenizer]] = {"vqmodel": VQModelTokenizer, "kmeans": KMeansTokenizer}
