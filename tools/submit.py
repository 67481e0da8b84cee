#!/usr/bin/env python
"""Submit vqd_scale jobs with submitit: training (+ eval after it), extraction arrays, evaluation.

    # training on 4 nodes x 8 GPUs, then one eval job when it has finished successfully
    python tools/submit.py train configs/laion_vqd_b.yaml run_dir=runs/vqd_b --nodes 4 --gpus-per-node 8 --eval after
    # CPU cluster / local processes
    python tools/submit.py train configs/tiny.yaml run_dir=runs/tiny --nodes 2 --cluster slurm
    python tools/submit.py train configs/tiny.yaml run_dir=runs/tiny --cluster local
    # extraction: one array task per input shard; arguments after `--` go to vqd-extract
    python tools/submit.py extract --inputs 'data/laion/{00000..00999}.tar' --gpus-per-node 1 \
        -- --out-dir tokens/laion --tokenizer tokenizers/vq --source laion
    # evaluation of a run directory: once after a job, or as a watcher next to training
    python tools/submit.py eval runs/vqd_b --after 12345
    python tools/submit.py eval runs/vqd_b --watch

Prints one line per job: its id and log paths. Submission only: without SLURM accounting submitit
cannot see job states, so follow jobs with squeue / the run directory (see README "Running on a cluster").
A refusal (bad config, bad pattern, sbatch's own) is one `submit.py: error:` line and exit 2, with
nothing queued for a bad config.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from vqd_scale.errors import UserError  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from vqd_scale.families import load_config  # noqa: E402
from vqd_scale.launch.submit import (Resources, submit_eval, submit_extract,  # noqa: E402
                                     submit_train)


def _add_resources(p: argparse.ArgumentParser, tasks_default: int | None = None) -> None:
    p.add_argument("--cluster", choices=["slurm", "local"], default="slurm",
                   help="explicit: submitit's auto mode picks slurm whenever srun is on PATH")
    p.add_argument("--folder", default="logs/submitit", help="submitit pickles and logs")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=0, help="0 on CPU; training runs one task per GPU")
    p.add_argument("--tasks-per-node", type=int, default=tasks_default,
                   help="default: one per GPU, or 1 on CPU")
    p.add_argument("--cpus-per-task", type=int, default=2)
    p.add_argument("--time", type=int, default=24 * 60, help="minutes; requeue continues past it")
    p.add_argument("--max-requeues", type=int, default=Resources.max_requeues,
                   help="time-outs / pre-emptions after which submitit stops requeuing (its own default is 3)")
    p.add_argument("--partition", default=None)
    p.add_argument("--python", default=sys.executable)


def _resources(a: argparse.Namespace) -> Resources:
    tasks = a.tasks_per_node or max(1, a.gpus_per_node)
    return Resources(nodes=a.nodes, tasks_per_node=tasks, gpus_per_node=a.gpus_per_node,
                     cpus_per_task=a.cpus_per_task, timeout_min=a.time, partition=a.partition,
                     max_requeues=a.max_requeues)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    sub = ap.add_subparsers(dest="what", required=True)
    t = sub.add_parser("train", help="vqd-train CONFIG OVERRIDES --resume auto")
    t.add_argument("config")
    t.add_argument("overrides", nargs="*", help="dotted overrides, e.g. run_dir=runs/x optim.lr=1e-4")
    t.add_argument("--eval", choices=["none", "after", "watch"], default="none",
                   help="also submit vqd-eval: after training succeeded, or as a watcher alongside")
    _add_resources(t)
    e = sub.add_parser("eval", help="vqd-eval RUN_DIR --once|--watch")
    e.add_argument("run_dir")
    e.add_argument("--after", default=None, help="job id that must finish successfully first")
    e.add_argument("--watch", action="store_true")
    _add_resources(e)
    x = sub.add_parser("extract", help="job array of vqd-extract tasks, by default one per input shard")
    x.add_argument("--inputs", required=True, help="braceexpand pattern(s) of input tars, '::'-joined")
    x.add_argument("--num-tasks", type=int, default=None, help="array size (default: number of input shards)")
    x.add_argument("extract_args", nargs=argparse.REMAINDER, help="after `--`: arguments for vqd-extract")
    _add_resources(x)
    a = ap.parse_args(argv)
    try:
        return _submit(a)
    except UserError as e:  # user errors: one line; anything else is a bug and keeps its traceback
        ap.exit(2, f"submit.py: error: {' '.join(str(e).split())}\n")


def _submit(a: argparse.Namespace) -> int:
    res = _resources(a)
    if a.what == "train":
        cfg = load_config(a.config, a.overrides)  # refuse a bad config before anything is queued
        job, info = submit_train(a.config, a.overrides, a.folder, a.cluster, res, a.python, run_dir=cfg.run_dir)
        print(info.line(), flush=True)
        print(f"train: run_dir {cfg.run_dir}", flush=True)
        if a.eval != "none":
            eres = Resources(nodes=1, tasks_per_node=1, gpus_per_node=min(1, a.gpus_per_node),
                             cpus_per_task=a.cpus_per_task, timeout_min=a.time, partition=a.partition,
                             max_requeues=a.max_requeues)
            after = job.job_id if a.eval == "after" else None
            _, einfo = submit_eval(cfg.run_dir, a.folder, a.cluster, eres, after=after,
                                   watch=a.eval == "watch", python=a.python)
            print(einfo.line(), flush=True)
    elif a.what == "eval":
        _, info = submit_eval(a.run_dir, a.folder, a.cluster, res, after=a.after, watch=a.watch, python=a.python)
        print(info.line(), flush=True)
    else:
        args = a.extract_args[1:] if a.extract_args[:1] == ["--"] else a.extract_args
        _, infos = submit_extract(a.inputs, args, a.folder, a.cluster, res, a.num_tasks, a.python)
        for info in infos:
            print(info.line(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
