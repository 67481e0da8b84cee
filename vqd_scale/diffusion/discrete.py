"""Mask-and-replace discrete diffusion (VQ-Diffusion): schedule, q_sample, posterior, losses, t-sampler.

Pure tensor code. Timesteps are 0-based (`t ∈ {0..T−1}`, code `t` = paper step `t+1`); the index
`t = −1` means "x_0 itself" (ᾱ = 1, β̄ = γ̄ = 0), which lets the last sampling step and the t = 0
loss term use the same posterior as every other step. K non-mask codes, mask id = K.
"""
from __future__ import annotations

from typing import Optional

import torch

from vqd_scale.config import DiscreteDiffusionConfig
from vqd_scale.diffusion.presets import resolve_endpoints

LOG_EPS = -70.0  # log-probabilities are clamped here (as the official code does): e^-70 ≈ 4e-31
# Weight of the uniform distribution mixed into the importance distribution: bounds the loss weight
# 1/p_t by T/UNIFORM_FLOOR so a t whose loss EMA is tiny cannot blow up a step.
UNIFORM_FLOOR = 0.01


def _log(x: torch.Tensor) -> torch.Tensor:
    """log of a probability, floored at LOG_EPS so zero probabilities stay finite."""
    return torch.log(x.clamp(min=0.0)).clamp(min=LOG_EPS)


def _require(ok: torch.Tensor, msg: str) -> None:
    """Raise ValueError(msg) unless the 0-dim bool `ok` is true; on an accelerator, assert asynchronously.

    Reading `ok` on the host would stall the GPU queue every call (several times per micro-step);
    `torch._assert_async` fails the device at the next sync point instead, with `msg` in the error.
    """
    if ok.device.type == "cpu":
        if not bool(ok):
            raise ValueError(msg)
    elif ok.device.type != "meta":
        torch._assert_async(ok, msg)


def log_onehot(x: torch.Tensor, num_rows: int) -> torch.Tensor:
    """Long[B,N] → F[B,num_rows,N] log one-hot (0 at the index, LOG_EPS elsewhere)."""
    out = torch.full((x.shape[0], num_rows, x.shape[1]), LOG_EPS, device=x.device)
    return out.scatter_(1, x.unsqueeze(1), 0.0)


class MaskAndReplace:
    """Mask-and-replace schedule and the math built on it (q_sample, q_posterior, losses)."""

    def __init__(self, cfg: DiscreteDiffusionConfig, num_classes: int):
        if num_classes < 2:
            raise ValueError(f"num_classes (K, non-mask codes) must be >= 2, got {num_classes}")
        self.cfg = cfg
        self.num_classes = K = int(num_classes)
        self.mask_id = K
        self.num_timesteps = T = int(cfg.num_timesteps)
        a0, a1, g0, g1 = resolve_endpoints(cfg.preset, cfg.alpha_cum_start, cfg.alpha_cum_end,
                                           cfg.gamma_cum_start, cfg.gamma_cum_end)
        # Cumulative schedule in float64 (the same arithmetic as diffusers), index 0 ↔ t = −1.
        frac = torch.arange(T, dtype=torch.float64) / (T - 1)
        one = torch.ones(1, dtype=torch.float64)
        self.alpha_cum = torch.cat([one, a0 + frac * (a1 - a0)])  # ᾱ, [T+1]
        self.gamma_cum = torch.cat([0 * one, g0 + frac * (g1 - g0)])  # γ̄, [T+1]
        self.beta_cum = (1 - self.alpha_cum - self.gamma_cum) / K  # β̄, K·β̄ = 1 − ᾱ − γ̄
        # One-step α_t, β_t, γ_t for t = 0..T−1 (transition from t−1 to t).
        self.alpha, self.beta, self.gamma = self._transition(torch.arange(-1, T - 1), torch.arange(T))
        if (self.beta < -1e-12).any() or (self.beta_cum < -1e-12).any():
            bad = int(torch.nonzero((self.beta < -1e-12))[0]) if (self.beta < -1e-12).any() else -1
            raise ValueError(f"diffusion schedule ({a0}, {a1}, {g0}, {g1}) gives a negative replace "
                             f"probability β at t={bad}; lower alpha_cum_start/gamma_cum_start so that "
                             "ᾱ_t + γ̄_t does not grow with t")
        self.device = torch.device("cpu")

    def to(self, device) -> "MaskAndReplace":
        """Move the (tiny, float64) schedule tables to `device`: indexing them by t on the device then
        needs no copy to the host (a CPU table indexed by a GPU t is a device→host sync per call)."""
        self.device = torch.device(device)
        for k in ("alpha_cum", "beta_cum", "gamma_cum", "alpha", "beta", "gamma"):
            setattr(self, k, getattr(self, k).to(self.device))
        return self

    # ---------------------------------------------------------------- schedule helpers
    def _cum(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(ᾱ_t, β̄_t, γ̄_t) float64 for t ∈ {−1..T−1}, on the tables' device."""
        i = t.to(self.alpha_cum.device) + 1
        return self.alpha_cum[i], self.beta_cum[i], self.gamma_cum[i]

    def _transition(self, s: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(α, β, γ) of the multi-step transition q(x_t | x_s), s < t: the family is closed under products."""
        a_s, _, g_s = self._cum(s)
        a_t, _, g_t = self._cum(t)
        alpha = a_t / a_s  # ᾱ_t = ᾱ_s · α_{s→t}
        gamma = 1 - (1 - g_t) / (1 - g_s)  # 1 − γ̄_t = (1 − γ̄_s)(1 − γ_{s→t})
        beta = (1 - alpha - gamma) / self.num_classes
        return alpha, beta, gamma

    def _coef(self, x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """float64 [B] probabilities → log, clamped, as [B,1,1] in `like`'s dtype/device."""
        return _log(x).to(like.device, like.dtype).view(-1, 1, 1)

    # ---------------------------------------------------------------- forward process
    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Draw x_t ~ q(x_t | x_0): keep w.p. ᾱ+β̄, each other code w.p. β̄, mask w.p. γ̄."""
        self._check_tokens(x0, allow_mask=False, name="x0")
        a, b, g = (v.to(x0.device, torch.float32).view(-1, 1) for v in self._cum(t))
        u = torch.rand(x0.shape, device=x0.device, generator=generator)
        # A uniform code draw hits x0 itself with prob 1/K, so "replace by uniform" w.p. K·β̄ gives
        # exactly β̄ per other code and ᾱ + β̄ for x0.
        replace = torch.randint(0, self.num_classes, x0.shape, device=x0.device, generator=generator)
        xt = torch.where(u < a, x0, replace)
        return xt.masked_fill_(u >= 1 - g, self.mask_id)

    # ---------------------------------------------------------------- reverse step
    def q_posterior(self, log_x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor,
                    t_prev: Optional[torch.Tensor] = None) -> torch.Tensor:
        """log p_θ(x_s | x_t) = log Σ_{x̃0} q(x_s | x_t, x̃0) · p̃(x̃0), s = t_prev (default t−1); F[B,K+1,N].

        Bayes: q(x_s | x_t, x̃0) = q(x_t | x_s) · q(x_s | x̃0) / q(x_t | x̃0), so

            p(x_s | x_t) = q(x_t | x_s) · Σ_{x̃0} q(x_s | x̃0) · w(x̃0),   w(x̃0) = p̃(x̃0) / q(x_t | x̃0).

        Every factor is a mask-and-replace row, so the sum needs no K×K matrix:
          * q(x_t | x̃0) (cumulative to t): ᾱ_t+β̄_t if x̃0 = x_t, β̄_t for another code; γ̄_t for every
            x̃0 when x_t is [MASK] (so w ∝ p̃ there).
          * Σ_{x̃0} q(x_s = j | x̃0) w(x̃0) = ᾱ_s·w_j + β̄_s·Σw for a code j, and γ̄_s·Σw for j = [MASK]
            (`logaddexp` and `logsumexp` in log space).
          * q(x_t | x_s) (multi-step s→t, `_transition`): for x_t = code i: α+β if j = i, β for
            another code, 0 from [MASK] (absorbing: a masked x_s cannot unmask); for x_t = [MASK]:
            γ from any code, 1 from [MASK].
        t_prev < t−1 gives skip-step sampling; t_prev = −1 means x_s = x_0 and returns ≈ p̃ itself.
        `log_x0` need not be normalised (truncation zeroes its tail); the result then sums to Σp̃.
        """
        B, K, N = log_x0.shape
        if K != self.num_classes:
            raise ValueError(f"log_x0 has {K} classes on dim 1; this diffusion has K={self.num_classes} "
                             "(pass log-probs over the non-mask codes as [B, K, N])")
        if x_t.shape != (B, N):
            raise ValueError(f"x_t shape {tuple(x_t.shape)} does not match log_x0 [B={B}, K, N={N}]")
        s = t - 1 if t_prev is None else t_prev
        _require((s < t).all() & (s >= -1).all(), "t_prev must satisfy −1 <= t_prev < t")
        masked = (x_t == self.mask_id).unsqueeze(1)  # [B,1,N]
        idx = x_t.clamp(max=K - 1).unsqueeze(1)  # [B,1,N]; the code index of unmasked x_t
        a_t, b_t, g_t = (self._coef(v, log_x0) for v in self._cum(t))
        a_s, b_s, g_s = (self._coef(v, log_x0) for v in self._cum(s))
        alpha, beta, gamma = self._transition(s, t)
        l_stay, l_beta, l_gamma = (self._coef(v, log_x0) for v in (alpha + beta, beta, gamma))

        # log w(x̃0) = log p̃(x̃0) − log q(x_t | x̃0)
        log_w = log_x0 - torch.where(masked, g_t, b_t)
        own = torch.where(masked, 0.0, b_t - torch.logaddexp(a_t, b_t))  # x̃0 = x_t: ᾱ_t+β̄_t, not β̄_t
        log_w = log_w.scatter_add(1, idx, own.expand(B, 1, N))
        log_sum_w = torch.logsumexp(log_w, dim=1, keepdim=True)  # [B,1,N]

        # Σ_{x̃0} q(x_s | x̃0) w(x̃0), rows = x_s: the K codes, then [MASK]
        codes = torch.logaddexp(a_s + log_w, b_s + log_sum_w)  # [B,K,N]
        mask_row = g_s + log_sum_w  # [B,1,N]

        # × q(x_t | x_s)
        codes = codes + torch.where(masked, l_gamma, l_beta)
        codes = codes.scatter_add(1, idx, torch.where(masked, 0.0, l_stay - l_beta).expand(B, 1, N))
        mask_row = torch.where(masked, mask_row, LOG_EPS)  # an unmasked x_t cannot come from [MASK]
        # Toward x_0 (s = −1) the posterior is p̃ itself, exactly: β̄_s = 0 there, but its floored log
        # (LOG_EPS) would leak through `logaddexp` and cap the decoder NLL of a confidently wrong token
        # near 49 nats (K = 1024) instead of −log p̃(x0). A `where`, not a branch: no host sync.
        to_x0 = (s == -1).to(log_x0.device).view(-1, 1, 1)
        codes = torch.where(to_x0, log_x0, codes)
        mask_row = torch.where(to_x0, LOG_EPS, mask_row)
        out = torch.cat([codes, mask_row], dim=1)  # [B,K+1,N]
        return out.clamp_(LOG_EPS, 0.0)

    def p_sample(self, log_x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor,
                 t_prev: Optional[torch.Tensor] = None, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Draw x_s ~ p_θ(x_s | x_t) exactly, without the [B,K+1,N] posterior; Long[B,N].

        p_θ(x_s | x_t) = Σ_{x̃0} q(x_s | x_t, x̃0) · p̃(x̃0) is a mixture with weights p̃, so a draw
        is x̃0 ~ p̃ (one categorical over K) followed by x_s ~ q(x_s | x_t, x̃0), which has only four
        distinct outcomes (see `posterior_sample`). Same distribution as sampling `q_posterior`.
        """
        s = t - 1 if t_prev is None else t_prev
        return self.posterior_sample(sample_categorical(log_x0, generator), x_t, t, s, generator)

    def posterior_sample(self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, s: torch.Tensor,
                         generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Draw x_s ~ q(x_s | x_t, x0) ∝ q(x_t | x_s)·q(x_s | x0) per token (Long[B,N] each).

        Unnormalised weights, with (α, β, γ) the s→t transition and bars the cumulative ones at s:
          x_t = [MASK]: every code γ·β̄_s, plus γ·ᾱ_s on x0, and γ̄_s on [MASK];
          x_t = code i: every code β·β̄_s, plus α·β̄_s on i, β·ᾱ_s on x0, α·ᾱ_s on i if i = x0.
        One uniform per token picks the piece; inside the "every code" piece it also picks the code.
        """
        K = self.num_classes
        alpha, beta, gamma = self._transition(s, t)
        a_s, b_s, g_s = self._cum(s)
        masked = x_t == self.mask_id
        same = x_t == x0
        dev = x_t.device
        col = lambda v: v.to(dev).view(-1, 1)  # float64 [B] → [B,1]
        per_code = torch.where(masked, col(gamma * b_s), col(beta * b_s))  # weight of each single code
        w_xt = torch.where(masked, 0.0, col(alpha * b_s) + same * col(alpha * a_s))
        w_x0 = torch.where(masked, col(gamma * a_s), col(beta * a_s))
        w_mask = torch.where(masked, col(g_s), 0.0)
        uniform = K * per_code
        total = uniform + w_xt + w_x0 + w_mask
        u = torch.rand(x_t.shape, dtype=torch.float64, device=dev, generator=generator) * total
        out = torch.where(u < uniform, (u / per_code.clamp(min=1e-300)).long().clamp_(max=K - 1), x_t)
        out = torch.where((u >= uniform + w_xt) & (u < uniform + w_xt + w_x0), x0, out)
        # `& masked`: rounding of u toward `total` must never mask an unmasked x_t (w_mask = 0 there)
        return out.masked_fill_((u >= uniform + w_xt + w_x0) & masked, self.mask_id)

    # ---------------------------------------------------------------- training loss
    def losses(self, log_x0_pred: torch.Tensor, x0: torch.Tensor, x_t: torch.Tensor,
               t: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-sample losses, each averaged over the N tokens: dict(loss, vlb, aux), all [B].

        vlb: KL(q(x_{t−1}|x_t,x0) ‖ p_θ(x_{t−1}|x_t)) for t > 0, −log p_θ(x0|x_t) at t = 0.
        aux: cross-entropy −log p̃(x0|x_t) on every position, weighted λ·(2 − t/T) in `loss`: the
        official "adaptive auxiliary loss" (`(1 − t/T) + 1` with 0-based t, mask_weight [1, 1], i.e.
        masked and unmasked positions alike). At t = 0 the official code puts the decoder NLL in the
        aux slot; here the posterior toward t = −1 is p̃ itself, so that is this same cross-entropy.
        The caller multiplies `loss` by the importance weight and feeds `vlb` to ImportanceSampler.
        """
        self._check_tokens(x0, allow_mask=False, name="x0")
        B, K, N = log_x0_pred.shape
        log_model = self.q_posterior(log_x0_pred, x_t, t)
        log_true = self.q_posterior(log_onehot(x0, K), x_t, t)
        kl = (log_true.exp() * (log_true - log_model)).sum(1)  # [B,N]
        nll = -log_model.gather(1, x0.unsqueeze(1)).squeeze(1)  # [B,N]
        vlb = torch.where((t == 0).view(-1, 1), nll, kl).mean(1)
        aux = -log_x0_pred.gather(1, x0.unsqueeze(1)).squeeze(1).mean(1)
        w_aux = self.cfg.aux_weight * (2.0 - t.to(log_x0_pred.dtype) / self.num_timesteps)
        return {"loss": vlb + w_aux * aux, "vlb": vlb, "aux": aux}

    def _check_tokens(self, x: torch.Tensor, allow_mask: bool, name: str) -> None:
        hi = self.num_classes + (1 if allow_mask else 0)
        if x.dtype != torch.long or x.dim() != 2:
            raise ValueError(f"{name} must be a LongTensor [B, N], got {x.dtype} {tuple(x.shape)}")
        if x.numel():
            _require((x >= 0).all() & (x < hi).all(), f"{name} has token ids outside [0, {hi}); check the "
                     f"tokenizer's num_classes (K={self.num_classes}) matches the data")


def sample_categorical(log_p: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Index along dim 1 of unnormalised log-probs F[B,K,N] → Long[B,N], by inverse CDF.

    Needs one uniform per position instead of K Gumbel draws, which dominates the cost on CPU.
    """
    lp = log_p.transpose(1, 2)  # [B,N,K]; contiguous when it came from a [B,N,K] head
    # Codes at the LOG_EPS floor (truncated, or log 0) get probability exactly 0, not e^-70 relative
    # to the max: otherwise a uniform draw of exactly 0 would pick the first code even if truncated.
    p = (lp - lp.amax(-1, keepdim=True)).exp_().masked_fill_(lp <= LOG_EPS, 0.0)
    cdf = p.contiguous().cumsum_(-1)  # [B,N,K]
    total = cdf[..., -1:]
    u = torch.rand(cdf.shape[:-1] + (1,), device=cdf.device, generator=generator) * total
    # right=True: first k with cdf[k] > u, so a zero-probability code is never picked; a u rounded up
    # to the total would fall past the end: clamp to the last code with probability (cdf first = total).
    last = (cdf < total).sum(-1, keepdim=True)  # [B,N,1]
    return torch.minimum(torch.searchsorted(cdf, u, right=True), last).squeeze(-1)


class ImportanceSampler:
    """Timestep sampler: uniform until every t was seen > min_count times, then p_t ∝ sqrt(EMA(L_t²))."""

    def __init__(self, num_timesteps: int, cfg: DiscreteDiffusionConfig):
        self.T = int(num_timesteps)
        self.enabled = cfg.importance_sampling
        self.min_count = cfg.importance_min_count
        self.decay = cfg.importance_ema
        self.ema_sq = torch.zeros(self.T, dtype=torch.float64)  # EMA of L_t², per t
        self.count = torch.zeros(self.T, dtype=torch.long)

    def ready(self) -> bool:
        """True once every t has more than `min_count` loss samples (importance phase)."""
        return self.enabled and bool((self.count > self.min_count).all())

    def probs(self) -> torch.Tensor:
        """Current p_t over t (float64 [T])."""
        if not self.ready():
            return torch.full((self.T,), 1.0 / self.T, dtype=torch.float64)
        root = self.ema_sq.sqrt()
        # t = 0 is the decoder NLL, far smaller than the KL terms: the official code reuses L_1's
        # value there, otherwise t = 0 would be rarely drawn and get a huge weight.
        root[0] = root[1]
        p = root / root.sum() if root.sum() > 0 else torch.full_like(root, 1.0 / self.T)
        return (1 - UNIFORM_FLOOR) * p + UNIFORM_FLOOR / self.T

    def sample(self, batch_size: int, device=None, generator: Optional[torch.Generator] = None):
        """(t Long[B], weight F[B]) with weight = 1/p_t, so E[weight·L_t] = Σ_t L_t.

        The weighted loss is an unbiased estimate of the whole VLB (all T terms, nats per token), the
        scale of the official code's `kl / pt`: its recipe (grad_clip 0.5, lr, aux weight) assumes it.
        Under uniform t this is T·L_t, not L_t: a per-term mean would be T times smaller and leave the
        official clip inert (docs/training.md, "Loss scale").
        """
        p = self.probs()
        gen_dev = generator.device if generator is not None else torch.device("cpu")
        t = torch.multinomial(p.to(gen_dev, torch.float32), batch_size, replacement=True, generator=generator)
        weight = (1.0 / p)[t.cpu()].float()
        return t.to(device), weight.to(device)

    def update(self, t: torch.Tensor, loss: torch.Tensor) -> None:
        """Fold in globally gathered per-sample (t, vlb); identical inputs keep every rank identical."""
        t = t.detach().reshape(-1).cpu().long()
        sq = loss.detach().reshape(-1).cpu().double().pow(2)
        if t.numel() != sq.numel():
            raise ValueError(f"update got {t.numel()} timesteps but {sq.numel()} losses")
        n = torch.zeros(self.T, dtype=torch.long).index_add_(0, t, torch.ones_like(t))
        mean_sq = torch.zeros(self.T, dtype=torch.float64).index_add_(0, t, sq) / n.clamp(min=1)
        seen = n > 0
        # First sighting initialises the EMA (no bias toward 0); afterwards one EMA step per t per update.
        new = torch.where(self.count > 0, self.decay * self.ema_sq + (1 - self.decay) * mean_sq, mean_sq)
        self.ema_sq = torch.where(seen, new, self.ema_sq)
        self.count += n

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors only, so it can ride along in a DeepSpeed checkpoint."""
        return {"ema_sq": self.ema_sq.clone(), "count": self.count.clone()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore `state_dict()`; refuses a state recorded for another number of timesteps."""
        if state["ema_sq"].shape != (self.T,):
            raise ValueError(f"importance-sampler state has {state['ema_sq'].shape[0]} timesteps, "
                             f"this run uses num_timesteps={self.T}")
        self.ema_sq = state["ema_sq"].detach().cpu().double().clone()
        self.count = state["count"].detach().cpu().long().clone()

