"""Runs a list of training runs one after another in ONE torchrun launch (tests/test_resume_matrix.py).

`python -m torch.distributed.run --nproc_per_node 2 tests/resume_worker.py SPEC.json`: each entry of
SPEC.json is {"name", "overrides", "resume", optional "prepare"}; each run is `vqd_scale.train.loop.run`
exactly as vqd-train calls it. "prepare" = {"copy": [src, dst], "overwrite": file}: before the run, rank 0
copies a finished run directory and overwrites 4 KiB in the middle of one of its files (damage of the same
size). Rank 0 writes {name: {"code", "error", "warnings"}} to SPEC.json's "results" path.

One launch instead of one per run: starting Python, torch and DeepSpeed twice per matrix row would cost
more than the runs. What one process carries from run to run, unlike separate vqd-train processes, is
undone here: the process group outlives each run (DeepSpeed's cached groups cannot be rebuilt in one
process, so `distributed.shutdown` is a no-op until the end), and `torch.nn.functional.linear`, which a
ZeRO-3 engine replaces for the rest of the process ("This will persist unless manually reset"), is put
back before each run (a ZeRO-1 run after a ZeRO-3 one would otherwise compute with ZeRO-3's linear).
"""
import json
import os
import shutil
import sys
import warnings

import torch

from vqd_scale.families import load_config
from vqd_scale import distributed as D
from vqd_scale.train import loop

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _fresh_linear() -> None:
    from deepspeed.runtime.zero.partition_parameters import InsertPostInitMethodToModuleSubClasses as Patched
    if hasattr(Patched, "linear_bk"):
        torch.nn.functional.linear = Patched.linear_bk


def main(spec_path: str) -> int:
    spec = json.loads(open(spec_path).read())
    shutdown, D.shutdown = D.shutdown, lambda: None
    results = {}
    for entry in spec["runs"]:
        if "prepare" in entry:
            if int(os.environ.get("RANK", "0")) == 0:
                shutil.copytree(*entry["prepare"]["copy"])
                with open(entry["prepare"]["overwrite"], "r+b") as f:
                    f.seek(os.path.getsize(entry["prepare"]["overwrite"]) // 2)
                    f.write(b"\x5a" * 4096)
            D.barrier()
        _fresh_linear()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                cfg = load_config(os.path.join(REPO, "configs", "tiny.yaml"), entry["overrides"])
                code, error = loop.run(cfg, resume=entry.get("resume", "auto")), None
            except ValueError as e:  # what vqd-train prints as "error: ..." and exits 2 with
                code, error = 2, str(e)
        results[entry["name"]] = {"code": code, "error": error,
                                  "warnings": [str(w.message) for w in caught if issubclass(w.category, UserWarning)]}
        print(f"resume_worker: {entry['name']} -> {code} {error or ''}", flush=True)
    if int(os.environ.get("RANK", "0")) == 0:
        with open(spec["results"], "w") as f:
            json.dump(results, f, indent=1)
    shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
