"""Submit training, extraction arrays and evaluation with submitit (SLURM, or local processes).

Pass `cluster` explicitly: submitit's AutoExecutor picks SLURM whenever `srun` is on PATH and then
fails if no controller answers. Without accounting (slurmdbd), submitit cannot read job states
(`job.state`, `job.result()` may wait forever on a dead job): poll `squeue`/`scontrol` or the
files the job writes instead — `JobInfo` gives the job id and log paths for that.
"""
from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence

import braceexpand
import submitit

from vqd_scale.errors import UserError
from vqd_scale.launch.jobs import EvalJob, ExtractTask, TrainJob

CLUSTERS = ("slurm", "local")


class SubmitError(UserError):
    """A submission refused before or by the scheduler; the message says why (tools/submit.py prints it)."""


@contextlib.contextmanager
def _scheduler_refusals() -> Iterator[None]:
    """sbatch's refusal (bad partition, unsatisfiable request, no controller) as a SubmitError."""
    try:
        yield
    except submitit.core.utils.FailedJobError as e:
        raise SubmitError(f"sbatch refused the job: {' '.join(str(e).split()) or 'no message'}") from None


@dataclass
class Resources:
    """What one job asks the scheduler for (submitit's parameter names, minutes for time)."""
    nodes: int = 1
    tasks_per_node: int = 1
    gpus_per_node: int = 0
    cpus_per_task: int = 2
    timeout_min: int = 60
    partition: Optional[str] = None
    signal_delay_s: int = 180
    array_parallelism: int = 64
    # requeues after a time-out before submitit gives up (its own default is 3); pre-emptions of a job
    # with --time under ~50 min also count (submitit's "timed out" test), as in slurm/common.sh
    max_requeues: int = 50


@dataclass
class JobInfo:
    """Printed after submission: job id and where its logs go."""
    kind: str
    job_id: str
    stdout: str
    stderr: str

    def line(self) -> str:
        return f"{self.kind}: job {self.job_id}  stdout {self.stdout}  stderr {self.stderr}"


def make_executor(folder: str | Path, cluster: str, res: Resources, name: str,
                  dependency: Optional[str] = None) -> submitit.AutoExecutor:
    """An executor for `cluster` ('slurm' or 'local') with `res`; `dependency` e.g. 'afterok:123'."""
    if cluster not in CLUSTERS:
        raise SubmitError(f"cluster={cluster!r}: use one of {CLUSTERS} (pass it explicitly; see module doc)")
    ex = submitit.AutoExecutor(folder=str(folder), cluster=cluster, slurm_max_num_timeout=res.max_requeues)
    params = dict(name=name, nodes=res.nodes, tasks_per_node=res.tasks_per_node,
                  cpus_per_task=res.cpus_per_task, timeout_min=res.timeout_min)
    if cluster == "slurm":
        extra = {"requeue": True, "open-mode": "append"}
        if dependency:
            extra["dependency"] = dependency
        params.update(slurm_signal_delay_s=res.signal_delay_s, slurm_array_parallelism=res.array_parallelism,
                      slurm_additional_parameters=extra)
        # `--gpus-per-node=0` keeps a GPU-less cluster (no GRES configured) happy
        params["slurm_gpus_per_node"] = res.gpus_per_node
        if res.partition:
            params["slurm_partition"] = res.partition
    elif dependency:
        raise SubmitError("job dependencies need SLURM; with cluster='local' run the eval as a watcher")
    ex.update_parameters(**params)
    return ex


def _info(kind: str, job: submitit.Job) -> JobInfo:
    return JobInfo(kind, str(job.job_id), str(job.paths.stdout), str(job.paths.stderr))


def submit_train(config: str, overrides: Sequence[str], folder: str | Path, cluster: str, res: Resources,
                 python: str = sys.executable, run_dir: Optional[str] = None) -> tuple[submitit.Job, JobInfo]:
    """Submit `vqd-train CONFIG OVERRIDES --resume auto` (checkpoint + requeue on pre-emption); with
    `run_dir`, each start and requeue is recorded in RUN_DIR/slurm_jobs.jsonl as the sbatch scripts do."""
    ex = make_executor(folder, cluster, res, "vqd-train")
    with _scheduler_refusals():
        job = ex.submit(TrainJob(config, overrides, python, run_dir=run_dir))
    return job, _info("train", job)


def submit_eval(run_dir: str, folder: str | Path, cluster: str, res: Resources, after: Optional[str] = None,
                watch: bool = False, extra: Sequence[str] = (), python: str = sys.executable):
    """Submit `vqd-eval RUN_DIR` once after job `after` succeeded, or as a watcher (`watch=True`)."""
    ex = make_executor(folder, cluster, res, "vqd-eval", dependency=f"afterok:{after}" if after else None)
    with _scheduler_refusals():
        job = ex.submit(EvalJob(run_dir, watch, extra, python))
    return job, _info("eval", job)


def expand_shards(pattern: str) -> list[str]:
    """Input shards of a braceexpand pattern, several patterns joined with '::'."""
    shards = [s for p in pattern.split("::") if p.strip() for s in braceexpand.braceexpand(p.strip())]
    if not shards:
        raise SubmitError(f"input pattern {pattern!r} expands to no shards")
    return shards


def submit_extract(inputs: str, extract_args: Sequence[str], folder: str | Path, cluster: str, res: Resources,
                   num_tasks: Optional[int] = None, python: str = sys.executable):
    """Submit a job array of `vqd-extract` tasks (by default one per input shard) and, on SLURM, one
    task after it that writes the final manifest.json (returns the jobs and one JobInfo per submission)."""
    n = num_tasks or len(expand_shards(inputs))
    ex = make_executor(folder, cluster, res, "vqd-extract")
    with _scheduler_refusals():
        jobs = ex.map_array(ExtractTask(inputs, extract_args, n, python), list(range(n)))
    infos = [_info(f"extract[{n} tasks]", jobs[0])]
    if cluster == "slurm":
        # every task rewrites manifest.json when it ends; two ending together can each miss the other's
        # shard, so one pass over all inputs (finished ones are skipped) writes the final manifest
        array_id = str(jobs[0].job_id).split("_")[0]
        mex = make_executor(folder, cluster, res, "vqd-extract-manifest", dependency=f"afterok:{array_id}")
        with _scheduler_refusals():
            mjob = mex.submit(ExtractTask(inputs, [*extract_args, "--fail-on-invalid-shard"], 1, python), 0)
        jobs.append(mjob)
        infos.append(_info("manifest", mjob))
    return jobs, infos
