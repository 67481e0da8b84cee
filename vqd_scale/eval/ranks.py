"""Where this process sits in a (possibly rank-parallel) eval job: chunks of samples per rank, gathers.

Sampling noise is seeded per global chunk, so every metric is the same for any number of ranks.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable

import torch

from vqd_scale import distributed as D
from vqd_scale.errors import UserError


@dataclasses.dataclass
class Ranks:
    """This process's place in the eval job; every collective goes through here (optional: world 1)."""
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def chunks(self, n: int, size: int) -> list[tuple[int, list[int]]]:
        """(global chunk id, sample indices) of the chunks this rank processes: chunk k → rank k mod world.

        Sampling noise is seeded per global chunk, so results do not depend on the number of ranks.
        """
        return [(k, c) for k, c in enumerate(split_chunks(list(range(n)), size)) if k % self.world == self.rank]

    def require_a_chunk_each(self, n: int, size: int, what: str = "eval.num_samples") -> None:
        """Refuse a split that leaves a rank without a chunk (it would have no rows to gather)."""
        n_chunks = len(split_chunks(list(range(n)), size))
        if n_chunks < self.world:
            raise UserError(f"{what}={n} in batches of eval.sampler.batch_size={size} gives {n_chunks} batches "
                            f"for {self.world} ranks; lower the batch size or the number of ranks")

    def gather_rows(self, x: torch.Tensor, n: int, size: int) -> torch.Tensor:
        """Rows of this rank's `chunks(n, size)` from every rank → all n rows in global order, on every rank."""
        if self.world == 1:
            return x
        owned = [[i for k, c in enumerate(split_chunks(list(range(n)), size)) if k % self.world == r for i in c]
                 for r in range(self.world)]
        per = max(map(len, owned))
        pad = x.new_zeros((per - x.shape[0], *x.shape[1:]))
        g = D.all_gather_cat(torch.cat([x, pad]).to(self.device)).cpu()  # [world·per, ...], rank order
        g = g.view(self.world, per, *x.shape[1:])  # [world, per, ...]
        out = x.new_empty((n, *x.shape[1:]))
        for r, idx in enumerate(owned):
            out[idx] = g[r, :len(idx)]
        return out

    def gather_objects(self, obj: Any) -> list:
        """Every rank's picklable `obj`, in rank order, on every rank."""
        if self.world == 1:
            return [obj]
        import torch.distributed as dist
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def decide(self, f: Callable[[], Any]) -> Any:
        """Run `f` on rank 0 and hand its (picklable) result to every rank."""
        if self.world == 1:
            return f()
        import torch.distributed as dist
        box = [f() if self.is_main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]


def setup_ranks() -> Ranks:
    """Rank / world / device from SLURM or torchrun; a process group only when there are several ranks."""
    env = D.detect_env()
    device = D.device_for(env)
    if env.world_size > 1:
        import torch.distributed as dist
        # Plain torch.distributed (no DeepSpeed import: seconds per rank, and eval needs no engine);
        # env:// reads what detect_env derived, e.g. from SLURM.
        os.environ.update(D.launch_vars(env, torch.cuda.device_count() if torch.cuda.is_available() else 0))
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=env.rank,
                                world_size=env.world_size)
    return Ranks(env.rank, env.world_size, device)


def split_chunks(idx: list[int], size: int) -> list[list[int]]:
    """Consecutive chunks of `size`; a last chunk of one joins the previous (batch statistics need two)."""
    out = [idx[i:i + size] for i in range(0, len(idx), size)]
    if len(out) > 1 and len(out[-1]) == 1:
        last = out.pop()  # (not `out[-2] += out.pop()`: the index would be taken before the pop)
        out[-1] = out[-1] + last
    return out
