"""Shifted Gaussian diffusion (Corgi, Zhou et al. 2023) over CLIP image embeddings.

The chain ends at N(μ, Σ) with Σ = diag(s²), s = κσ, instead of N(0, I):
    q(z_t | z_0) = N(√ᾱ_t z_0 + (1 − √ᾱ_t) μ, (1 − ᾱ_t) Σ).
Implementation: this is exactly standard DDPM on y = (z − μ)/s, so every operation maps z → y,
runs the textbook DDPM formula, and maps back (z = μ + s·y). The loss is computed in z space.
Plain DDPM is the special case μ = 0, s = 1 (`shifted=False`, the ablation baseline).

Timesteps are 0-based (code t = paper step t+1). Pure tensor code: no I/O, no model, no
distributed code; sampling takes a `denoise(z_t, t) -> (ẑ0_cond, ẑ0_uncond | None)` callable.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from vqd_scale.config import ShiftedDiffusionConfig

Denoise = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, Optional[torch.Tensor]]]
VARIANCES = ("large", "small")  # large = β_t Σ (as released), small = posterior β̃_t Σ


def respace(num_timesteps: int, steps: int) -> list[int]:
    """The t's visited when sampling with `steps` steps: evenly spaced from T−1 down to 0."""
    if not 1 <= steps <= num_timesteps:
        raise ValueError(f"sampling steps={steps} must be in [1, num_timesteps={num_timesteps}]")
    if steps == 1:
        return [num_timesteps - 1]
    # spacing (T−1)/(steps−1) >= 1, so rounding never merges two steps
    return torch.linspace(num_timesteps - 1, 0, steps).round().long().tolist()


def _bcast(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Per-sample [B] coefficient → [B, 1, …] to broadcast over the embedding dims."""
    return v.to(like.dtype).reshape(-1, *([1] * (like.dim() - 1)))


class ShiftedGaussianDiffusion:
    """Linear-β schedule plus the shifted forward process, posterior, loss and ancestral sampler."""

    def __init__(self, cfg: ShiftedDiffusionConfig):
        if cfg.sample_variance not in VARIANCES:
            raise ValueError(f"shifted.sample_variance={cfg.sample_variance!r}; use one of {VARIANCES}")
        if cfg.p2_target not in ("x0", "eps"):
            raise ValueError(f"shifted.p2_target={cfg.p2_target!r}; use 'x0' (as released) or 'eps'")
        self.cfg = cfg
        self.num_timesteps = cfg.num_timesteps
        # float64 for the schedule so ᾱ_t near 0 keeps its precision; cast at use
        self.betas = torch.linspace(cfg.beta_start, cfg.beta_end, cfg.num_timesteps, dtype=torch.float64)
        self.alphas_cumprod = torch.cumprod(1.0 - self.betas, 0)

    def to(self, device) -> "ShiftedGaussianDiffusion":
        """Move the schedule tables to `device` (in place; returns self)."""
        self.betas = self.betas.to(device)
        self.alphas_cumprod = self.alphas_cumprod.to(device)
        return self

    # -- frame: z ↔ y = (z − μ)/s -------------------------------------------------------------
    def frame(self, mu: Optional[torch.Tensor], sigma: Optional[torch.Tensor], like: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """(μ, s = κσ) of the terminal Gaussian; (0, 1) when not shifted or no mixture is given."""
        if not self.cfg.shifted or mu is None:
            return torch.zeros_like(like), torch.ones_like(like)
        if sigma is None:
            raise ValueError("shifted diffusion needs both mu and sigma (per-dim std of the component)")
        return mu.expand_as(like), (self.cfg.kappa * sigma).expand_as(like)

    def _abar(self, t: torch.Tensor) -> torch.Tensor:
        """ᾱ_t for t ≥ 0 and 1 for t = −1 (the clean end), shape [B] float64."""
        a = self.alphas_cumprod[t.clamp(min=0)]
        return torch.where(t >= 0, a, torch.ones_like(a))

    # -- forward process ------------------------------------------------------------------------
    def q_sample(self, z0: torch.Tensor, t: torch.Tensor, mu: torch.Tensor, scale: torch.Tensor,
                 noise: torch.Tensor) -> torch.Tensor:
        """z_t ~ q(z_t | z_0) = μ + s·(√ᾱ_t y_0 + √(1 − ᾱ_t) ε), y_0 = (z_0 − μ)/s."""
        a = _bcast(self._abar(t), z0)
        y0 = (z0 - mu) / scale
        return mu + scale * (a.sqrt() * y0 + (1 - a).sqrt() * noise)

    def marginal(self, z0: torch.Tensor, t: torch.Tensor, mu: torch.Tensor, scale: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """Closed form of q(z_t | z_0): mean √ᾱ z_0 + (1 − √ᾱ) μ, variance (1 − ᾱ) s² (per dim)."""
        a = _bcast(self._abar(t), z0)
        return a.sqrt() * z0 + (1 - a.sqrt()) * mu, (1 - a) * scale ** 2

    # -- posterior ------------------------------------------------------------------------------
    def posterior_coefs(self, t: torch.Tensor, t_prev: Optional[torch.Tensor] = None
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(c₁, c₂, β̃, β) of q(z_{t_prev} | z_t, z_0); β = 1 − ᾱ_t/ᾱ_{t_prev} (respaced β), [B] float64."""
        t_prev = t - 1 if t_prev is None else t_prev
        a_t, a_s = self._abar(t), self._abar(t_prev)
        beta = 1 - a_t / a_s
        c1 = beta * a_s.sqrt() / (1 - a_t)
        c2 = (1 - a_s) * (1 - beta).sqrt() / (1 - a_t)
        var = beta * (1 - a_s) / (1 - a_t)
        return c1, c2, var, beta

    def q_posterior(self, z0: torch.Tensor, zt: torch.Tensor, t: torch.Tensor, mu: torch.Tensor,
                    scale: torch.Tensor, t_prev: Optional[torch.Tensor] = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and per-dim variance of q(z_{t_prev} | z_t, z_0), computed as DDPM in y space."""
        c1, c2, var, _ = self.posterior_coefs(t, t_prev)
        y0, yt = (z0 - mu) / scale, (zt - mu) / scale
        mean_y = _bcast(c1, z0) * y0 + _bcast(c2, z0) * yt
        return mu + scale * mean_y, _bcast(var, z0) * scale ** 2

    # -- training -------------------------------------------------------------------------------
    def sample_t(self, batch: int, device, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Uniform t ∈ {0, …, T−1}, LongTensor[B]."""
        return torch.randint(0, self.num_timesteps, (batch,), device=device, generator=generator)

    def weight(self, t: torch.Tensor) -> torch.Tensor:
        """Per-sample weight of the ẑ0 MSE; [B] float32.

        P2 (γ = 1, k = 1) is 1/(1 + SNR_t) = 1 − ᾱ_t on the loss named by `p2_target`: on the ẑ0 MSE itself
        ("x0", as released), or on the ε MSE ("eps", as P2 is defined), which is SNR_t·(1 − ᾱ_t) = ᾱ_t on the
        ẑ0 MSE (ε-MSE = SNR·x0-MSE). 1 when P2 is off.
        """
        if not self.cfg.p2_weighting:
            return torch.ones(t.shape, device=t.device)
        a = self._abar(t)
        return (a if self.cfg.p2_target == "eps" else 1 - a).float()

    def loss(self, z0_pred: torch.Tensor, z0: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Per-sample z_0-prediction MSE in z space times `weight(t)` (P2, as released); [B]."""
        mse = (z0_pred.float() - z0.float()).pow(2).flatten(1).mean(1)
        return mse * self.weight(t).to(mse.device)

    # -- sampling -------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, denoise: Denoise, mu: torch.Tensor, scale: torch.Tensor, steps: int,
               generator: Optional[torch.Generator] = None, guidance_scale: float = 1.0,
               x0_bounds: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
        """Ancestral sampling from z_T = μ + s·ε over `steps` respaced steps; returns ẑ_0 [B, E].

        Variance per step is β Σ (`large`, as released) or β̃ Σ (`small`); β is the respaced
        1 − ᾱ_t/ᾱ_{t_prev}. No noise is added on the last step. Guidance mixes ẑ_0 predictions:
        ẑ_u + g·(ẑ_c − ẑ_u). `x0_bounds` = (lo, hi) clamps ẑ_0 (e.g. μ ± 3σ).
        """
        ts = respace(self.num_timesteps, steps)
        z = mu + scale * torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
        B = mu.shape[0]
        for i, t_int in enumerate(ts):
            t = torch.full((B,), t_int, device=mu.device, dtype=torch.long)
            t_prev = torch.full_like(t, ts[i + 1] if i + 1 < len(ts) else -1)
            cond, uncond = denoise(z, t)
            z0 = cond if uncond is None or guidance_scale == 1.0 else torch.lerp(uncond, cond, guidance_scale)
            if x0_bounds is not None:
                z0 = torch.maximum(torch.minimum(z0, x0_bounds[1]), x0_bounds[0])
            mean, var = self.q_posterior(z0, z, t, mu, scale, t_prev)
            if t_prev[0] < 0:
                z = mean
                break
            if self.cfg.sample_variance == "large":
                _, _, _, beta = self.posterior_coefs(t, t_prev)
                var = _bcast(beta, z) * scale ** 2
            noise = torch.randn(z.shape, generator=generator, device=z.device, dtype=z.dtype)
            z = mean + var.sqrt() * noise
        return z
