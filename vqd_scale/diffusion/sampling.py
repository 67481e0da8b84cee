"""Samplers over a `denoise(x_t, t) -> (log_p_cond, log_p_uncond | None)` callable.

One entry point, `sample`, covers full T-step and skip-step sampling, discrete classifier-free
guidance, truncation and purity sampling (Improved VQ-Diffusion). Pure tensor code: the caller
owns the model (and decides whether to compute the unconditional branch at all).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from vqd_scale.config import SamplerConfig
from vqd_scale.diffusion.discrete import LOG_EPS, MaskAndReplace, sample_categorical
from vqd_scale.errors import UserError

Denoise = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, Optional[torch.Tensor]]]


def timesteps(num_timesteps: int, steps: int) -> list[int]:
    """The t's the net is evaluated at: `steps` values from T−1 down to 0, evenly spaced."""
    if not 1 <= steps <= num_timesteps:
        raise UserError(f"sampler steps={steps} must be in [1, num_timesteps={num_timesteps}]")
    # spacing (T−1)/(steps−1) >= 1, so rounding never merges two steps
    return torch.linspace(num_timesteps - 1, 0, steps).round().long().tolist()


def purity_counts(num_tokens: int, steps: int) -> list[int]:
    """Tokens to unmask at each visited step: as even as possible, summing to num_tokens."""
    edges = [(k * num_tokens) // steps for k in range(steps + 1)]
    return [b - a for a, b in zip(edges[:-1], edges[1:])]


def guide(log_c: torch.Tensor, log_u: Optional[torch.Tensor], scale: float, normalise: bool = True) -> torch.Tensor:
    """Discrete CFG: log p_u + s·(log p_c − log p_u), renormalised over the K codes.

    `normalise=False` skips the logsumexp when only a draw is needed (sampling is shift-invariant).
    """
    if log_u is None:
        return log_c
    out = torch.lerp(log_u, log_c, scale)  # log_u + s·(log_c − log_u)
    if not normalise:
        return out
    return (out - out.logsumexp(1, keepdim=True)).clamp_(min=LOG_EPS)


def truncate(log_p: torch.Tensor, rate: float) -> torch.Tensor:
    """Keep the most probable codes while the probability before them is < rate; the rest → LOG_EPS.

    Top-1 is always kept. Not renormalised (as the official code): the posterior and Gumbel-max
    sampling are invariant to a per-position scale.
    """
    if rate >= 1.0:
        return log_p
    sorted_lp, order = log_p.sort(dim=1, descending=True)
    cum = sorted_lp.exp().cumsum(1)
    # exclusive cumulative sum by shifting: cumsum − p rounds below r at the boundary token
    keep_sorted = torch.ones_like(cum, dtype=torch.bool)
    keep_sorted[:, 1:] = cum[:, :-1] < rate
    keep = torch.empty_like(keep_sorted).scatter_(1, order, keep_sorted)  # back to code order
    return log_p.masked_fill(~keep, LOG_EPS)


def _purity_step(x: torch.Tensor, log_x0: torch.Tensor, count: int, temperature: float, mask_id: int,
                 generator: Optional[torch.Generator]) -> torch.Tensor:
    """Fill `count` masked positions, chosen ∝ purity = max_j p̃(j); filled tokens stay."""
    if count <= 0:
        return x
    masked = x == mask_id  # [B,N]
    purity = log_x0.max(1).values.exp()  # [B,N]
    if temperature > 0:
        # Official prior_rule 2: purity normalised by its per-image max before sharpening
        # softmax((1 + r·purity)·log p̃); the choice of positions below is scale-free anyway.
        score = purity / purity.max(1, keepdim=True).values.clamp(min=1e-10)
        log_x0 = ((1 + temperature * score).unsqueeze(1) * log_x0).log_softmax(1)
    tokens = sample_categorical(log_x0, generator)  # [B,N]
    # tiny floor: a masked position must stay drawable even if its purity underflows
    weights = torch.where(masked, purity + 1e-12, 0.0)
    pos = torch.multinomial(weights, count, replacement=False, generator=generator)  # [B,count]
    return x.scatter(1, pos, tokens.gather(1, pos))


def check_sampler_config(cfg: SamplerConfig, num_timesteps: int) -> None:
    """Refuse sampler settings that cannot work, naming the key."""
    if not 1 <= cfg.steps <= num_timesteps:
        raise UserError(f"sampler.steps={cfg.steps} must be in [1, num_timesteps={num_timesteps}]")
    if not 0.0 < cfg.truncation_rate <= 1.0:
        raise UserError(f"sampler.truncation_rate={cfg.truncation_rate} must be in (0, 1]")
    if cfg.guidance_scale < 0:
        raise UserError(f"sampler.guidance_scale={cfg.guidance_scale} must be >= 0")
    if cfg.purity_temperature < 0:
        raise UserError(f"sampler.purity_temperature={cfg.purity_temperature} must be >= 0")


@torch.inference_mode()
def sample(diffusion: MaskAndReplace, denoise: Denoise, batch_size: int, num_tokens: int,
           cfg: SamplerConfig, generator: Optional[torch.Generator] = None,
           device=None) -> torch.Tensor:
    """Generate Long[B,N] tokens from all-[MASK], visiting `timesteps(T, cfg.steps)`.

    Each step: net at t → guidance → truncation → either a draw from p_θ(x_{t_prev} | x_t) toward the
    next visited t (`MaskAndReplace.p_sample`) or, with `cfg.purity`, a fixed number of positions
    filled from p̃; the last step draws every position from p̃ (the posterior toward x0). Noise comes only from `generator`
    (its device is the sampling device).
    """
    T, K = diffusion.num_timesteps, diffusion.num_classes
    check_sampler_config(cfg, T)
    ts = timesteps(T, cfg.steps)
    # purity fills every position by the step before the last; the last step redraws them all
    counts = purity_counts(num_tokens, max(len(ts) - 1, 1))
    if device is None:
        device = generator.device if generator is not None else diffusion.device
    x = torch.full((batch_size, num_tokens), K, dtype=torch.long, device=device)
    for i, t in enumerate(ts):
        t_prev = ts[i + 1] if i + 1 < len(ts) else -1
        t_vec = torch.full((batch_size,), t, dtype=torch.long, device=device)
        log_c, log_u = denoise(x, t_vec)
        if log_c.shape != (batch_size, K, num_tokens):
            raise ValueError(f"denoise returned {tuple(log_c.shape)}; expected log-probs "
                             f"[B={batch_size}, K={K}, N={num_tokens}]")
        # normalised probabilities are only needed by truncation and purity
        exact = cfg.truncation_rate < 1.0 or cfg.purity
        log_x0 = truncate(guide(log_c, log_u, cfg.guidance_scale, normalise=exact), cfg.truncation_rate)
        if t_prev < 0:
            # The posterior toward x0 is p̃ itself. With purity too, every position is redrawn from the
            # final prediction, filled ones included, as the official `prior_rule` does at t = 0.
            x = sample_categorical(log_x0, generator)
        elif cfg.purity:
            x = _purity_step(x, log_x0, counts[i], cfg.purity_temperature, K, generator)
        else:
            x = diffusion.p_sample(log_x0, x, t_vec, torch.full_like(t_vec, t_prev), generator)
    return x
