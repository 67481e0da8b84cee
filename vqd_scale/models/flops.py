"""Training FLOPs per sample, counted from what runs (for MFU / HFU and the capacity planner).

A multiply-add is 2 FLOPs. Only matmuls and attention are counted (norms, activations, the loss and
embedding lookups are memory-bound and conventionally left out). A matmul costs its forward F once and
2F in the backward (input and weight gradients); a layer whose input needs no gradient (a projection
of frozen text features) costs F + F. Attention is counted in full: QKᵀ and AV forward (4·S_q·S_k·D per
layer), twice that backward; FlashAttention's recomputation of the scores in the backward is not
counted. `model` FLOPs are what MFU divides; `hardware` adds the forward that activation checkpointing
runs again in the backward (HFU). Checked against `torch.utils.flop_counter` in tests/test_gpu_paths.py.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StepFlops:
    """Per-sample FLOPs of one training step."""
    train: float  # forward + backward of the trained network
    recompute: float  # forward run again by activation checkpointing (0 without it)
    frozen: float  # frozen text tower forward

    @property
    def model(self) -> float:
        return self.train + self.frozen

    @property
    def hardware(self) -> float:
        return self.model + self.recompute


def vqd_flops(layers: int, dim: int, mlp_ratio: float, num_tokens: int, context_len: int, context_dim: int,
              num_classes: int, checkpointing: bool, text_fwd: float = 0.0) -> StepFlops:
    """VQ-Diffusion transformer (models/transformer.py): N image tokens, L text tokens, K-way head."""
    D, N, L, H = dim, num_tokens, context_len, int(dim * mlp_ratio)
    per_token = 2 * D * 3 * D + 3 * (2 * D * D) + 2 * (2 * D * H)  # qkv, proj1/q2/proj2, fc1 + fc2
    attention = 2 * (2 * N * N * D) + 2 * (2 * N * L * D)  # self (QKᵀ, AV over N keys) + cross (over L)
    per_sample = 2 * (2 * D * 2 * D)  # the two AdaLN linears act on the timestep embedding, once per sample
    block = N * per_token + attention + per_sample
    kv = L * 2 * context_dim * 2 * D  # cross-attention K/V per text token (outside the checkpointed block)
    head = N * 2 * D * num_classes
    fwd = layers * (block + kv) + head
    # Every input here needs a gradient (the null context is a parameter mixed into the text features;
    # embeddings are trainable), so the backward is 2× the forward throughout.
    # torch's non-reentrant checkpoint stops recomputing once the saved tensors are back: the block's
    # last matmul (fc2, whose output nothing saves) is not run again.
    recompute = layers * (block - N * 2 * H * D) if checkpointing else 0.0
    return StepFlops(train=3.0 * fwd, recompute=float(recompute), frozen=text_fwd)


def prior_flops(layers: int, dim: int, context_len: int, context_dim: int, embed_dim: int, num_components: int,
                checkpointing: bool, text_fwd: float = 0.0) -> StepFlops:
    """Shifted-diffusion prior (models/prior.py): L context tokens + 5 special tokens, causal blocks."""
    D, L, E = dim, context_len, embed_dim
    S = L + 5
    block = S * (2 * D * 3 * D + 2 * D * D + 2 * (2 * D * 4 * D)) + 2 * (2 * S * S * D)  # qkv, proj, MLP; attn
    # Input projections of data that needs no gradient: forward + weight gradient only (2F).
    inputs = L * 2 * context_dim * D + 2 * (2 * E * D) + 2 * D * D  # context, text emb + z_t, time MLP's first
    trained_in = 2 * D * D  # time MLP's second linear (its input depends on the first's weights)
    head = 2 * D * D + 2 * D * E  # on the query token only
    fwd_full = layers * block + trained_in + head
    recompute = layers * (block - S * 2 * 4 * D * D) if checkpointing else 0.0  # all but the last MLP linear
    choose = 2 * num_components * E  # cosine to the mixture means picks the component (no gradient)
    return StepFlops(train=3.0 * fwd_full + 2.0 * inputs + choose, recompute=float(recompute), frozen=text_fwd)


def text_tower_flops(width: int, layers: int, context_len: int, mlp_ratio: float = 4.0) -> float:
    """Forward FLOPs per sample of an open_clip text transformer (no gradient: it is frozen)."""
    W, L = width, context_len
    return layers * (L * (2 * W * 3 * W + 2 * W * W + 2 * (2 * W * int(W * mlp_ratio))) + 2 * (2 * L * L * W))


def frozen_text_flops(text_encoder) -> float:
    """`text_tower_flops` of a FrozenCLIPTextEncoder (open_clip text transformer), read off its modules."""
    blocks = text_encoder.clip.transformer.resblocks
    mlp_ratio = blocks[0].mlp.c_fc.out_features / text_encoder.width
    return text_tower_flops(text_encoder.width, len(blocks), text_encoder.context_length, mlp_ratio)
