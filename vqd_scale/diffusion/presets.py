"""Named endpoints of the mask-and-replace schedule: (ᾱ_1, ᾱ_T, γ̄_1, γ̄_T)."""
from __future__ import annotations

from typing import Optional

from vqd_scale.errors import UserError

SCHEDULE_PRESETS: dict[str, tuple[float, float, float, float]] = {
    # What the official checkpoints and diffusers use: ᾱ+γ̄ ≈ 1, so effectively mask-only.
    "released": (0.99999, 0.000009, 0.000009, 0.99999),
    # The paper's mask-and-replace: final mask rate 0.9, replacement mass K·β̄_T = 0.1.
    "paper": (0.99999, 0.000009, 0.000009, 0.9),
}

ENDPOINT_KEYS = ("alpha_cum_start", "alpha_cum_end", "gamma_cum_start", "gamma_cum_end")


def resolve_endpoints(preset: str, alpha_cum_start: Optional[float] = None,
                      alpha_cum_end: Optional[float] = None, gamma_cum_start: Optional[float] = None,
                      gamma_cum_end: Optional[float] = None) -> tuple[float, float, float, float]:
    """Preset endpoints with any explicitly given endpoint overriding; `custom` needs all four."""
    given = (alpha_cum_start, alpha_cum_end, gamma_cum_start, gamma_cum_end)
    if preset == "custom":
        missing = [k for k, v in zip(ENDPOINT_KEYS, given) if v is None]
        if missing:
            raise UserError(f"diffusion.preset='custom' needs every endpoint; set diffusion.{missing[0]} "
                             f"(missing: {', '.join(missing)})")
        base = given
    elif preset in SCHEDULE_PRESETS:
        base = SCHEDULE_PRESETS[preset]
    else:
        raise UserError(f"diffusion.preset={preset!r} unknown; use one of {sorted(SCHEDULE_PRESETS)} or 'custom'")
    a0, a1, g0, g1 = (float(b if v is None else v) for b, v in zip(base, given))
    problems = []
    if not (0.0 < a1 <= a0 <= 1.0):
        problems.append(f"need 0 < alpha_cum_end ({a1}) <= alpha_cum_start ({a0}) <= 1")
    if not (0.0 <= g0 <= g1 < 1.0):
        problems.append(f"need 0 <= gamma_cum_start ({g0}) <= gamma_cum_end ({g1}) < 1")
    if a0 + g0 > 1.0 or a1 + g1 > 1.0:
        problems.append(f"need alpha_cum + gamma_cum <= 1 at both ends (got {a0 + g0:.6g}, {a1 + g1:.6g})")
    if problems:
        raise UserError("diffusion schedule endpoints invalid: " + "; ".join(problems))
    return a0, a1, g0, g1
