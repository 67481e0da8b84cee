"""Capacity planner for VQ-Diffusion runs: memory per GPU and time per step, from the config alone.

Memory per rank is the sum of
- model states, by ZeRO stage, as DeepSpeed 0.19 allocates them (weights, gradients, fp32 master +
  AdamW m/v; a ZeRO-3 rank also keeps the small "persistent" parameters whole, a flat gradient
  partition and its reduce bucket) — the formulas of docs/performance.md, checked against live-tensor
  counts of real CPU runs (bench/memory.py);
- activations and backward temporaries: one training step (q_sample, transformer, loss, backward)
  *run on the meta device* under torch's MemTracker, which follows every tensor's lifetime without
  allocating anything — the fused attention kernel is substituted for the math one that torch would
  pick on meta (the fused one, like FlashAttention on GPU, keeps only its output and log-sum-exp);
- communication buffers, the frozen fp32 text tower, and on rank 0 the fp32 EMA (4Ψ).
On a GPU the CUDA context, NCCL and the caching allocator's fragmentation come on top of what
`torch.cuda.max_memory_allocated` reports; `CUDA_RESERVE` is an estimate of that, not a measurement.
Step time = FLOPs that run (models/flops.py, recompute included) × samples / (ranks × peak × assumed
utilisation).
"""
from __future__ import annotations

import dataclasses
import functools
import warnings
from typing import Optional
from unittest import mock

import torch
import torch.nn.functional as F

from vqd_scale.config import TransformerConfig
from vqd_scale.families import RunConfig
from vqd_scale.errors import UserError

GiB = 2**30
PERSISTENCE_THRESHOLD = 100_000  # DeepSpeed's stage3_param_persistence_threshold default (elements)
# Not in max_memory_allocated: CUDA context + cuBLAS/NCCL workspaces (fixed) and allocator fragmentation
# (a fraction of the allocated peak). Estimates from common H100 runs, to be replaced by measurements.
CUDA_FIXED_GIB, CUDA_FRAGMENTATION = 1.5, 0.10


def _dtype(precision: str) -> torch.dtype:
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]


def _cached(fn):
    """Memoise on the arguments' reprs (the config dataclasses are mutable, hence unhashable)."""
    memo: dict[str, object] = {}

    @functools.wraps(fn)
    def wrapper(*args):
        key = repr(args)
        if key not in memo:
            memo[key] = fn(*args)
        return memo[key]
    return wrapper


@_cached
def param_numels(model_cfg: TransformerConfig) -> tuple[int, ...]:
    """Element count of every trainable parameter (model built on the meta device: instant)."""
    from vqd_scale.models.transformer import VQDiffusionTransformer
    with torch.device("meta"):
        return tuple(p.numel() for p in VQDiffusionTransformer(model_cfg).parameters())


def text_dims(text_model: str, tiny_width: int = 64, tiny_layers: int = 2) -> tuple[int, int, int, int]:
    """(width, layers, vocab, embed_dim) of the open_clip text tower `text_model` (config only, no weights)."""
    if text_model == "tiny":
        return tiny_width, tiny_layers, 49408, 32
    from vqd_scale.compat import import_open_clip
    conf = import_open_clip().get_model_config(text_model)
    if conf is None:
        raise UserError(f"text.model={text_model!r} is not an open_clip model name")
    t = conf["text_cfg"]
    return t["width"], t["layers"], t.get("vocab_size", 49408), conf["embed_dim"]


def text_tower_params(text_model: str, tiny_width: int = 64, tiny_layers: int = 2) -> int:
    """Parameters of the frozen text tower: token + position embedding, blocks, final LN, projection."""
    w, layers, vocab, embed = text_dims(text_model, tiny_width, tiny_layers)
    return vocab * w + 77 * w + layers * (12 * w * w + 13 * w) + 2 * w + w * embed + 1


def _fused_sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """The CPU flash kernel (saves output + log-sum-exp, like FlashAttention on GPU); it has a meta kernel."""
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q, k, v, dropout_p, is_causal, attn_mask=attn_mask, scale=scale)[0]


def step_bytes(model_cfg: TransformerConfig, batch: int, precision: str, keep_grads: bool) -> float:
    """`traced_step_bytes` at any batch and depth from four traces of 1-2 layers at batch 1-2.

    Every block is the same and every tensor scales with the batch, so the peak is bilinear in
    (batch, layers) — exact as long as it falls at the same point of the step (it does: the start of the
    backward); tests/test_plan.py checks it against direct traces.
    """
    from vqd_scale.models.transformer import resolve_size
    s = resolve_size(model_cfg)
    shallow = dataclasses.replace(model_cfg, layers=1, dim=s.dim, heads=s.heads, mlp_ratio=s.mlp_ratio)
    f = {(b, n): traced_step_bytes(dataclasses.replace(shallow, layers=n), b, precision, keep_grads)
         for b in (1, 2) for n in (1, 2)}
    per_b = lambda n: f[(2, n)] - f[(1, n)]  # noqa: E731
    at_batch = {n: f[(1, n)] + (batch - 1) * per_b(n) for n in (1, 2)}
    return at_batch[1] + (s.layers - 1) * (at_batch[2] - at_batch[1])


@_cached
def traced_step_bytes(model_cfg: TransformerConfig, batch: int, precision: str, keep_grads: bool) -> int:
    """Peak bytes of one training step's activations and temporaries (+ full gradients if `keep_grads`),
    beyond the weights, from the step run on the meta device under torch's MemTracker."""
    from torch.distributed._tools.mem_tracker import MemTracker

    from vqd_scale.config import DiscreteDiffusionConfig
    from vqd_scale.diffusion.discrete import MaskAndReplace
    from vqd_scale.families.vqd.task import TrainableVQD

    meta = torch.device("meta")
    model = TrainableVQD(dataclasses.replace(model_cfg, dropout=0.0)).to(meta).to(_dtype(precision)).train()
    diffusion = MaskAndReplace(DiscreteDiffusionConfig(num_timesteps=model_cfg.num_timesteps),
                               model_cfg.num_classes).to(meta)
    if not keep_grads:  # ZeRO-2/3 move each gradient into a bucket as it is produced
        for p in model.parameters():
            p.register_post_accumulate_grad_hook(lambda p: setattr(p, "grad", None))
    tracker = MemTracker()
    tracker.track_external(model)
    warnings.filterwarnings("ignore", message="Expected a tensor or a traceable wrapper-subclass",
                            module="torch.distributed._tools.mem_tracker")  # None outputs of some ops
    B, N = batch, model_cfg.height * model_cfg.width
    with tracker, mock.patch.object(F, "scaled_dot_product_attention", _fused_sdpa):
        # What families/vqd/task.py's loss does with a batch (the text features arrive in fp32).
        x0 = torch.empty(B, N, dtype=torch.long, device=meta)
        t = torch.empty(B, dtype=torch.long, device=meta)
        context = torch.empty(B, model_cfg.context_len, model_cfg.context_dim, device=meta)
        drop, weight = torch.empty(B, dtype=torch.bool, device=meta), torch.empty(B, device=meta)
        x_t = diffusion.q_sample(x0, t)
        log_x0 = model(x_t, t, context=context, drop_text=drop)
        loss = (diffusion.losses(log_x0.float(), x0, x_t, t)["loss"] * weight).mean()
        loss.backward()
    snap = tracker.get_tracker_snapshot("peak")[meta]
    return int(snap["Total"] - sum(v for k, v in snap.items() if str(k).endswith("PARAM")))


@dataclasses.dataclass(frozen=True)
class Memory:
    """Bytes per rank: what lives through the step, and the larger of its two peaks on top of that."""
    weights: float
    optimizer: float  # fp32 master + AdamW m, v
    gradients: float  # gradient storage that outlives the backward (ZeRO-3 partition, fp32 accumulation)
    buffers: float  # communication buckets and ZeRO-3 gathered parameters that live through the step
    text_tower: float  # frozen fp32 text encoder
    backward: float  # activations + temporaries (+ gradients being produced) at the backward's peak
    step: float  # fp32 gradients + AdamW temporaries during the optimizer step
    ema: float  # fp32 EMA, rank 0 only

    @property
    def static(self) -> float:
        return self.weights + self.optimizer + self.gradients + self.buffers + self.text_tower

    @property
    def allocated(self) -> float:
        """Peak allocated on a rank other than 0 (≈ torch.cuda.max_memory_allocated)."""
        return self.static + max(self.backward, self.step)

    @property
    def rank0(self) -> float:
        return self.allocated + self.ema


def conditioning(cfg: RunConfig) -> tuple[int, bool]:
    """(context length the cross-attention sees, whether the text tower runs) of cfg's family.

    A decoder's few embedding-projection parameters (≈3M at B with 768-d embeddings) are not counted."""
    from vqd_scale import families
    fam = families.get(cfg.task)
    if fam.sections.get("model") is not TransformerConfig:
        raise UserError(f"the planner covers families whose model is the VQ-Diffusion transformer, not task={cfg.task}")
    return fam.plan_context(cfg) if fam.plan_context else (cfg.model.context_len, True)


def memory_per_rank(cfg: RunConfig, world: int, precision: str, device_type: str = "cuda") -> Memory:
    """Peak bytes per rank of a training step of `cfg` on `world` data-parallel ranks."""
    context_len, reads_text = conditioning(cfg)
    ds, N = cfg.deepspeed, world
    numels = param_numels(cfg.model)
    psi = sum(numels)
    low = precision in ("bf16", "fp16")
    b = 2 if low else 4
    stage, bucket = ds.zero_stage, ds.bucket_elements
    overlap = device_type == "cuda" and stage >= 1
    comm = 4 if (not low or ds.communication_dtype == "fp32") else 2
    weights = b * psi
    if stage == 3:  # small parameters stay whole on every rank
        persistent = sum(n for n in numels if n <= PERSISTENCE_THRESHOLD)
        weights = b * ((psi - persistent) / N + persistent)
    # DeepSpeed keeps an fp32 master partition even for fp32 weights once ZeRO partitions the optimizer.
    optimizer = ((4 * psi if low else 0) + 8 * psi) if stage == 0 else 12 * psi / N
    gradients = 4 * psi / N if low and ds.grad_accum > 1 else 0.0  # fp32 accumulation partition
    buffers = 0.0
    if stage == 3:  # flat gradient partition, reduce bucket, parameters gathered around the running layer
        gradients += b * psi / N
        buffers = comm * bucket + b * min(psi, 2 * bucket)
    # Stage 0 (and stage 1 without overlap_comm) hold every gradient whole until the boundary: they are
    # part of the traced step. Stages 1-2 with buckets fill a partition while the activations are freed.
    full_grads = stage == 0 or (stage == 1 and not overlap)
    backward = step_bytes(dataclasses.replace(cfg.model, context_len=context_len), cfg.data.batch_size, precision,
                          full_grads)
    if stage in (1, 2):
        # DeepSpeed allocates its gradient staging bucket(s) (model dtype; two with overlap_comm) when the
        # backward starts and converts each filled bucket to the communication dtype; the activation peak
        # falls in the loss, before that, so the two peaks are not added.
        staging = b * bucket * (2 if overlap else 1) + (4 * min(bucket, psi) if low and comm == 4 else 0)
        backward = max(backward, staging + (0.0 if full_grads else b * psi / N))
    # Optimizer step: fp32 gradients for AdamW (next to the 16-bit ones) and its foreach temporary (√v, the
    # size of what it updates); ZeRO then all-gathers the updated weights through a bucket.
    if stage == 0:
        step = (b * psi if low else 0) + 4 * psi + 4 * psi
    else:
        step = (b + 4 + 4) * psi / N + b * bucket
    text = 4 * text_tower_params(cfg.text.model, cfg.text.tiny_width, cfg.text.tiny_layers) if reads_text else 0
    return Memory(weights, optimizer, gradients, buffers, text, backward, step, ema=4 * psi)


def cuda_reserved(allocated: float) -> float:
    """Estimated device memory a process needs for `allocated` bytes of tensors (context, NCCL, fragmentation)."""
    return allocated * (1 + CUDA_FRAGMENTATION) + CUDA_FIXED_GIB * GiB


@dataclasses.dataclass(frozen=True)
class Plan:
    """One planned configuration and what it costs."""
    size: str
    zero_stage: int
    world: int
    batch: int
    checkpointing: bool
    params: int
    memory: Memory  # bytes per rank
    rank0_bytes: float  # allocated on rank 0 (+ EMA)
    reserved_bytes: float  # with the CUDA overhead estimate
    gpu_bytes: float
    step_s: float
    days: float
    mfu: float  # implied by the assumed utilisation

    @property
    def fits(self) -> bool:
        return self.reserved_bytes <= self.gpu_bytes

    @property
    def used(self) -> float:
        return self.reserved_bytes / self.gpu_bytes


def plan(cfg: RunConfig, gpus_per_node: int, nodes: int, gpu_gib: float, peak_flops: float, util: float,
         precision: str = "bf16") -> Plan:
    """Memory and time of `cfg` on `nodes` × `gpus_per_node` GPUs of `gpu_gib` GiB.

    `util` is the assumed fraction of `peak_flops` achieved on the FLOPs that run (HFU): activation
    checkpointing's recompute then costs time, and the MFU it implies is util × model / hardware FLOPs.
    """
    from vqd_scale.models.flops import text_tower_flops, vqd_flops
    from vqd_scale.models.transformer import resolve_size

    world = gpus_per_node * nodes
    mem = memory_per_rank(cfg, world, precision, "cuda")
    rank0 = mem.rank0
    m, s = cfg.model, resolve_size(cfg.model)
    context_len, reads_text = conditioning(cfg)
    text_w, text_layers, _, _ = text_dims(cfg.text.model, cfg.text.tiny_width, cfg.text.tiny_layers)
    text_fwd = text_tower_flops(text_w, text_layers, m.context_len) if reads_text else 0.0
    flops = vqd_flops(s.layers, s.dim, s.mlp_ratio, m.height * m.width, context_len, m.context_dim, m.num_classes,
                      m.activation_checkpointing, text_fwd)
    global_batch = cfg.data.batch_size * cfg.deepspeed.grad_accum * world
    step_s = flops.hardware * global_batch / (world * peak_flops * util)
    days = step_s * cfg.max_samples / global_batch / 86400
    return Plan(m.size, cfg.deepspeed.zero_stage, world, cfg.data.batch_size, m.activation_checkpointing,
                sum(param_numels(cfg.model)), mem, rank0, cuda_reserved(rank0), gpu_gib * GiB, step_s, days,
                util * flops.model / flops.hardware)


def warnings_for(p: Plan) -> list[str]:
    """What a person should change: does not fit, or leaves most of the card idle."""
    out = []
    if not p.fits:
        out.append(f"does NOT fit: ≈{p.reserved_bytes / GiB:.1f} GiB needed on rank 0 of {p.gpu_bytes / GiB:.0f} GiB "
                   "(smaller batch + grad_accum, activation checkpointing, or a higher ZeRO stage)")
    elif p.used < 0.5:
        out.append(f"uses only {100 * p.used:.0f}% of the GPU memory: a larger per-GPU batch (or no activation "
                   "checkpointing) would raise throughput")
    return out


def largest_batch(cfg: RunConfig, gpus_per_node: int, nodes: int, gpu_gib: float, precision: str = "bf16",
                  headroom: float = 0.9,
                  candidates: tuple[int, ...] = (4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)
                  ) -> Optional[int]:
    """The largest candidate per-GPU batch whose rank-0 estimate stays under `headroom` of the card."""
    best = None
    for bs in candidates:
        c = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, batch_size=bs))
        p = plan(c, gpus_per_node, nodes, gpu_gib, 1.0, 1.0, precision)
        if p.reserved_bytes <= headroom * p.gpu_bytes:
            best = bs
        else:
            break
    return best
