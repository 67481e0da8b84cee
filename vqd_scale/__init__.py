"""vqd_scale: VQ-Diffusion and Shifted Diffusion training at LAION scale."""
__version__ = "0.1.0"
