"""Distributed environment: rank/world from SLURM or torchrun (or one plain process), process group, collectives.

The same entry point runs as a plain process, under `torchrun` and under `srun`. SLURM variables win
when `SLURM_PROCID` is set *and* torchrun's are not, because `srun python -m torch.distributed.run`
sets both and torchrun's are then the truth for its children. MASTER_ADDR / MASTER_PORT from the
environment always win; a plain process without them takes a free port, so two plain runs on one
machine do not collide.
"""
from __future__ import annotations

import os
import socket
import subprocess
from dataclasses import dataclass
from typing import Mapping, Optional

import torch
import torch.distributed as dist

from vqd_scale.errors import UserError

DEFAULT_PORT = 29500
# SLURM jobs without MASTER_PORT: a port per job id, below Linux's default ephemeral range (32768+), so
# an outgoing connection never holds it; slurm/common.sh derives the same one.
SLURM_PORT_BASE, SLURM_PORT_SPAN = 20000, 12000


def slurm_job_port(job_id: int) -> int:
    """The rendezvous port of SLURM job `job_id` (same on every node; a requeued job keeps it)."""
    return SLURM_PORT_BASE + job_id % SLURM_PORT_SPAN


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits: global rank, rank on its node, world size, rendezvous address."""
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    master_addr: str = "127.0.0.1"
    master_port: int = DEFAULT_PORT
    launcher: str = "single"  # single | torchrun | slurm

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _first_slurm_host(nodelist: str) -> str:
    """First host of a SLURM nodelist (`node[1-4]` → `node1`) via `scontrol show hostnames`."""
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True,
                             text=True, timeout=30, check=True).stdout.split()
        if out:
            return out[0]
    except (OSError, subprocess.SubprocessError):
        pass
    if "[" not in nodelist:  # a single plain host name needs no scontrol
        return nodelist.split(",")[0]
    raise RuntimeError(f"cannot expand SLURM nodelist {nodelist!r}: `scontrol show hostnames` failed; "
                       "set MASTER_ADDR to the first node's host name")


def _int(env: Mapping[str, str], key: str) -> int:
    try:
        return int(env[key])
    except ValueError:
        raise UserError(f"environment variable {key}={env[key]!r} is not an integer") from None


def free_port(addr: str = "127.0.0.1") -> int:
    """A port the OS reports free on `addr` (bound to port 0, then released)."""
    with socket.socket() as s:
        s.bind((addr, 0))
        return s.getsockname()[1]


def _port(env: Mapping[str, str]) -> int:
    port = _int(env, "MASTER_PORT")
    if not 1 <= port <= 65535:
        raise UserError(f"environment variable MASTER_PORT={port} is not a TCP port; use 1-65535 or unset it")
    return port


def detect_env(env: Optional[Mapping[str, str]] = None) -> DistEnv:
    """Read rank / local rank / world size and the rendezvous address from the environment."""
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        rank, world, local = _int(env, "RANK"), _int(env, "WORLD_SIZE"), _int(env, "LOCAL_RANK") if "LOCAL_RANK" in env else 0
        launcher = "torchrun"
        addr = env.get("MASTER_ADDR", "127.0.0.1")
    elif "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        rank, world = _int(env, "SLURM_PROCID"), _int(env, "SLURM_NTASKS")
        local = _int(env, "SLURM_LOCALID") if "SLURM_LOCALID" in env else 0
        launcher = "slurm"
        addr = env.get("MASTER_ADDR") or (
            _first_slurm_host(env["SLURM_JOB_NODELIST"]) if env.get("SLURM_JOB_NODELIST") else "127.0.0.1")
    else:
        # One plain process still starts a (one-rank) process group for DeepSpeed; a fixed default port
        # would make two plain runs on one machine collide, so take a free one unless told otherwise.
        addr = env.get("MASTER_ADDR") or "127.0.0.1"
        port = _port(env) if env.get("MASTER_PORT") else free_port("127.0.0.1" if addr == "127.0.0.1" else "")
        return DistEnv(master_addr=addr, master_port=port)
    # A fixed per-job port lets several jobs share a node (SLURM) without colliding; ranks on other
    # nodes must compute the same port, so no free-port search here.
    job = env.get("SLURM_JOB_ID", "")
    default_port = slurm_job_port(int(job)) if job.isdigit() else DEFAULT_PORT
    port = _port(env) if env.get("MASTER_PORT") else default_port
    if not (0 <= rank < world):
        raise UserError(f"rank {rank} is outside world size {world}; check the launcher's environment")
    return DistEnv(rank, local, world, addr, port, launcher)


def gpu_index(local_rank: int, device_count: int) -> int:
    """The CUDA device (among those visible to this process) that rank `local_rank` of its node drives.

    torchrun and `srun` without GPU binding show every GPU of the node to every task: the rank's own
    is `local_rank`. `--gpus-per-task=1` / `--gpu-bind` show each task only its own GPU (device 0),
    while SLURM_LOCALID still counts 0..7 — asking for device `local_rank` would fail on ranks 1..7.
    """
    if device_count < 1:
        raise UserError("no CUDA device is visible to this process (CUDA_VISIBLE_DEVICES?)")
    if local_rank < device_count:
        return local_rank
    if device_count == 1:
        return 0
    raise UserError(f"local rank {local_rank} but this process sees only {device_count} GPUs: run at most one "
                     "task per GPU (srun --ntasks-per-node <= GPUs per node, or --gpus-per-task=1)")


def device_for(env: DistEnv) -> torch.device:
    """This rank's device: its local GPU when CUDA is available, else the CPU."""
    if torch.cuda.is_available():
        torch.cuda.set_device(gpu_index(env.local_rank, torch.cuda.device_count()))
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def launch_vars(env: DistEnv, device_count: int) -> dict[str, str]:
    """The variables torch.distributed's env:// rendezvous and DeepSpeed read.

    DeepSpeed binds `cuda:LOCAL_RANK` (engine, NCCL `device_id`, ZeRO-3 partitioning), so LOCAL_RANK is
    the index of this rank's GPU among the visible ones (`gpu_index`), not the raw rank on the node.
    """
    local = gpu_index(env.local_rank, device_count) if device_count > 0 else env.local_rank
    return dict(RANK=str(env.rank), LOCAL_RANK=str(local), WORLD_SIZE=str(env.world_size),
                MASTER_ADDR=env.master_addr, MASTER_PORT=str(env.master_port))


def init_distributed(env: DistEnv) -> None:
    """Start the process group (NCCL on GPU, gloo on CPU) through DeepSpeed, also for one process."""
    import deepspeed

    cuda = torch.cuda.is_available()
    # torch.distributed's env:// rendezvous reads these; export what we derived (e.g. from SLURM).
    os.environ.update(launch_vars(env, torch.cuda.device_count() if cuda else 0))
    if not dist.is_initialized():
        backend = "nccl" if cuda else "gloo"
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False,
                                   rank=env.rank, world_size=env.world_size, verbose=False)


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def all_gather_cat(x: torch.Tensor) -> torch.Tensor:
    """Concatenate a same-shaped tensor from every rank along dim 0 (rank order)."""
    if world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, 0)


def mean_over_ranks(x: torch.Tensor) -> torch.Tensor:
    """Average a tensor over ranks (for logging)."""
    if world_size() == 1:
        return x
    x = x.clone()
    dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x / world_size()


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def shutdown() -> None:
    """Destroy the process group if one was started."""
    if dist.is_initialized():
        dist.destroy_process_group()


def agree(flags: list[bool], device: torch.device) -> list[bool]:
    """Element-wise OR of boolean flags over ranks, in one collective (save/stop decisions)."""
    t = torch.tensor([1.0 if f else 0.0 for f in flags], device=device)
    if world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [bool(v > 0) for v in t.tolist()]


def all_gather_object(obj):
    """`obj` from every rank, in rank order (picklable objects; also a barrier)."""
    if world_size() == 1:
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def from_main(obj):
    """Rank 0's `obj` on every rank (e.g. a refusal only rank 0 can decide, raised by all alike)."""
    if world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
