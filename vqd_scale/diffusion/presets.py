"""Named endpoints of the mask-and-replace schedule: (ᾱ_1, ᾱ_T, γ̄_1, γ̄_T)."""

SCHEDULE_PRESETS: dict[str, tuple[float, float, float, float]] = {
    # What the official checkpoints and diffusers use: ᾱ+γ̄ ≈ 1, so effectively mask-only.
    "released": (0.99999, 0.000009, 0.000009, 0.99999),
    # The paper's mask-and-replace: final mask rate 0.9, replacement mass K·β̄_T = 0.1.
    "paper": (0.99999, 0.000009, 0.000009, 0.9),
}
