"""GPU code paths checked on CPU: device selection, FLOP counts (MFU/HFU) against torch's FLOP counter,
the peak-FLOPs table, DeepSpeed settings for CUDA, precision choice, no host reads in the diffusion
math, and bf16 DeepSpeed (real engines, 2 gloo ranks) for the EMA's fp32 master weights and resume."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from vqd_scale.config import (DeepSpeedConfig, DiscreteDiffusionConfig, OptimConfig, PriorConfig,
                              ShiftedDiffusionConfig, TextEncoderConfig, TransformerConfig)
from vqd_scale.distributed import DistEnv, gpu_index, launch_vars
from vqd_scale.train.engine import choose_precision, ds_config
from vqd_scale.models.flops import prior_flops, text_tower_flops, vqd_flops
from vqd_scale.train.metrics import peak_flops_for

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- item 1: which GPU a rank drives
def test_gpu_index_with_all_or_one_visible_gpu():
    assert [gpu_index(r, 8) for r in range(8)] == list(range(8))  # torchrun / srun without binding
    assert [gpu_index(r, 1) for r in range(8)] == [0] * 8  # --gpus-per-task=1: each task sees its own GPU as 0
    with pytest.raises(ValueError, match="at most one task per GPU"):
        gpu_index(5, 4)
    with pytest.raises(ValueError, match="no CUDA device"):
        gpu_index(0, 0)


def test_launch_vars_give_deepspeed_the_visible_gpu_index():
    # DeepSpeed binds cuda:LOCAL_RANK: rank 5 of a node whose tasks each see one GPU must export 0.
    env = DistEnv(rank=13, local_rank=5, world_size=16, master_addr="n0", master_port=20001, launcher="slurm")
    assert launch_vars(env, device_count=1) == dict(RANK="13", LOCAL_RANK="0", WORLD_SIZE="16", MASTER_ADDR="n0",
                                                    MASTER_PORT="20001")
    assert launch_vars(env, device_count=8)["LOCAL_RANK"] == "5"
    assert launch_vars(env, device_count=0)["LOCAL_RANK"] == "5"  # CPU: no device to bind


# ---------------------------------------------------------------- item 2: FLOPs of what runs
def _counted(fn) -> int:
    """FLOPs torch's dispatcher-level counter sees; the math SDPA backend runs attention as bmm's it counts."""
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
        fn()
    return fc.get_total_flops()


@pytest.mark.parametrize("ckpt", [False, True])
def test_vqd_flops_equal_flop_counter(ckpt):
    from vqd_scale.families.vqd.task import TrainableVQD
    cfg = TransformerConfig(size="debug", num_classes=50, height=4, width=6, context_dim=48, context_len=7,
                            num_timesteps=10, layers=2, dim=32, heads=4, mlp_ratio=3.0, activation_checkpointing=ckpt)
    m = TrainableVQD(cfg).train()
    B = 3
    x, t = torch.randint(0, 51, (B, 24)), torch.randint(0, 10, (B,))
    ctx, drop = torch.randn(B, 7, 48), torch.tensor([True, False, False])
    counted = _counted(lambda: m(x, t, context=ctx, drop_text=drop).sum().backward())
    f = vqd_flops(2, 32, 3.0, 24, 7, 48, 50, ckpt)
    assert counted == B * f.hardware  # exact: every matmul and attention product accounted for
    assert (f.recompute > 0) == ckpt and f.model == f.train
    # The old 6·Ψ·N estimate counted every weight once per image token (AdaLN, K/V, embeddings included).
    psi = sum(p.numel() for p in m.parameters())
    assert 6 * psi * 24 > 1.2 * f.train


@pytest.mark.parametrize("ckpt", [False, True])
def test_prior_flops_equal_flop_counter(ckpt):
    from vqd_scale.families.prior.task import TrainablePrior
    pc = PriorConfig(size="debug", embed_dim=24, context_dim=40, context_len=9, layers=2, dim=32, heads=4,
                     num_components=3, activation_checkpointing=ckpt)
    m = TrainablePrior(pc, ShiftedDiffusionConfig(num_timesteps=50, shifted=False)).train()
    B = 3
    args = (torch.randn(B, 24), torch.randint(0, 50, (B,)), torch.randn(B, 24), torch.randn(B, 24),
            torch.randn(B, 9, 40), torch.tensor([True, False, False]))
    counted = _counted(lambda: m(*args)[0].backward())
    assert counted == B * prior_flops(2, 32, 9, 40, 24, 3, ckpt).hardware


def test_text_tower_flops_equal_flop_counter():
    from vqd_scale.models.text import FrozenCLIPTextEncoder
    from vqd_scale.models.flops import frozen_text_flops
    te = FrozenCLIPTextEncoder(TextEncoderConfig(model="tiny", tiny_width=64, tiny_layers=2, tiny_heads=2))
    counted = _counted(lambda: te(torch.randint(1, 400, (3, 77))))
    assert counted == 3 * text_tower_flops(64, 2, 77) == 3 * frozen_text_flops(te)


def test_peak_flops_table_matches_whole_model_names():
    names = {  # torch.cuda.get_device_name strings → dense bf16 peak
        "NVIDIA H100 80GB HBM3": 989e12, "NVIDIA H100 PCIe": 756e12, "NVIDIA H100 NVL": 835e12,
        "NVIDIA H200": 989e12, "NVIDIA GH200 480GB": 989e12, "NVIDIA A100-SXM4-80GB": 312e12,
        "NVIDIA A100 80GB PCIe": 312e12, "NVIDIA L40S": 362e12, "NVIDIA L40": 181e12, "NVIDIA L4": 121e12,
        "NVIDIA A10": 125e12, "NVIDIA A10G": None, "Tesla V100-SXM2-32GB": None, "NVIDIA GeForce RTX 4090": None}
    for name, peak in names.items():
        assert peak_flops_for(name, "bf16") == peak, name
    assert peak_flops_for("Tesla V100-SXM2-32GB", "fp16") == 125e12
    assert peak_flops_for("Tesla V100-PCIE-16GB", "fp16") == 112e12
    assert peak_flops_for("NVIDIA H100 80GB HBM3", "fp32") == 66.9e12


# ---------------------------------------------------------------- items 3, 5, 7: DeepSpeed settings
def test_ds_config_overlaps_comm_on_cuda_only():
    for stage in (1, 2, 3):
        cuda = ds_config(DeepSpeedConfig(zero_stage=stage), OptimConfig(), 8, 2, "bf16", "cuda")
        cpu = ds_config(DeepSpeedConfig(zero_stage=stage), OptimConfig(), 8, 2, "fp32", "cpu")
        assert cuda["zero_optimization"]["overlap_comm"] is True
        assert cpu["zero_optimization"]["overlap_comm"] is False


def test_ds_config_fp32_accumulation_and_communication():
    conf = ds_config(DeepSpeedConfig(zero_stage=2, grad_accum=4), OptimConfig(), 8, 2, "bf16", "cuda")
    assert conf["data_types"] == {"grad_accum_dtype": "fp32"} and conf["communication_data_type"] == "fp32"
    one = ds_config(DeepSpeedConfig(zero_stage=2, grad_accum=1), OptimConfig(), 8, 2, "bf16", "cuda")
    assert "data_types" not in one  # nothing to accumulate: no extra fp32 gradient buffer
    model = ds_config(DeepSpeedConfig(zero_stage=3, communication_dtype="model"), OptimConfig(), 8, 2, "bf16", "cuda")
    assert "communication_data_type" not in model  # DeepSpeed's default: the training dtype
    fp32 = ds_config(DeepSpeedConfig(zero_stage=2, grad_accum=4), OptimConfig(), 8, 2, "fp32", "cpu")
    assert "data_types" not in fp32 and "communication_data_type" not in fp32
    for stage in (0, 1):
        with pytest.raises(ValueError, match="zero_stage 2 or 3"):
            ds_config(DeepSpeedConfig(zero_stage=stage, grad_accum=2), OptimConfig(), 8, 2, "bf16", "cuda")
    fp16 = ds_config(DeepSpeedConfig(zero_stage=2), OptimConfig(), 8, 2, "fp16", "cuda")
    assert fp16["fp16"]["enabled"] and fp16["fp16"]["loss_scale"] == 0 and not fp16["bf16"]["enabled"]


def test_precision_auto_needs_native_bf16():
    assert choose_precision("auto", "cuda", True)[0] == "bf16"  # A100 / H100
    prec, why = choose_precision("auto", "cuda", False)  # V100 / T4: bf16 only by emulation
    assert prec == "fp16" and "loss scaling" in why
    assert choose_precision("auto", "cpu", False)[0] == "fp32"
    with pytest.raises(ValueError, match="no native bf16"):
        choose_precision("bf16", "cuda", False)
    with pytest.raises(ValueError, match="needs a GPU"):
        choose_precision("fp16", "cpu", False)
    assert choose_precision("bf16", "cpu", False)[0] == "bf16"  # DeepSpeed runs bf16 on CPU (tests, gpu_check)


# ---------------------------------------------------------------- item 6: no host reads in the diffusion math
def test_diffusion_math_never_reads_device_values_on_the_host():
    """Meta tensors have no values: any .item()/.cpu()/bool() of one raises, as a host read would stall a GPU."""
    from vqd_scale.diffusion.discrete import MaskAndReplace
    d = MaskAndReplace(DiscreteDiffusionConfig(num_timesteps=10), 7).to("meta")
    x0 = torch.empty(2, 5, dtype=torch.long, device="meta")
    t = torch.empty(2, dtype=torch.long, device="meta")
    x_t = d.q_sample(x0, t)
    log_x0 = torch.empty(2, 7, 5, device="meta")
    assert d.losses(log_x0, x0, x_t, t)["loss"].shape == (2,)
    assert d.q_posterior(log_x0, x_t, t, t - 3).shape == (2, 8, 5)
    assert d.p_sample(log_x0, x_t, t, t - 3).shape == (2, 5)
    assert d.alpha_cum.device.type == "meta"  # the tables moved with .to()


# ---------------------------------------------------------------- item 4: fp32 master weights (real bf16 DeepSpeed)
@pytest.mark.slow
def test_bf16_ema_reads_fp32_master_and_resume_restores_it(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "PYTHONWARNINGS": "ignore"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(k, None)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
                        str(REPO / "tests" / "gpu_paths_worker.py"), "0,1,2,3", str(tmp_path)],
                       capture_output=True, text=True, timeout=600, cwd=REPO, env=env)
    line = next((ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")), None)
    assert r.returncode == 0 and line, r.stdout[-1000:] + r.stderr[-4000:]
    res = json.loads(line[len("RESULT "):])
    for stage, out in res.items():
        assert out["precision"] == "bf16", stage
        assert out["bf16_differs_from_master"] and out["bf16_is_rounded_master"], (stage, out)  # the test can tell
        assert out["ema_equals_fp32_master"], (stage, out)
        assert out["master_rounded_without_set"] and out["master_exact_after_set"], (stage, out)
        assert out["comm_dtype"] == "torch.float32", (stage, out)
    assert res["2"]["accum_dtype"] == res["3"]["accum_dtype"] == "torch.float32"  # grad_accum 2 summed in fp32
