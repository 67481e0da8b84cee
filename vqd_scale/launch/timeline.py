"""How long a run's SLURM jobs spent starting and requeueing, from RUN_DIR/slurm_jobs.jsonl + metrics.jsonl
(written by slurm/*.sh and by submitit's TrainJob).

    python -m vqd_scale.launch.timeline RUN_DIR
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

JOBS_FILE = "slurm_jobs.jsonl"


def record(run_dir: str | os.PathLike, event: str, **extra) -> None:
    """Append one event line as slurm/common.sh's `vqd_record` does (job id, restart count, nodes, time)."""
    e = os.environ
    line = {"event": event, "job_id": e.get("SLURM_JOB_ID", ""), "array_task_id": e.get("SLURM_ARRAY_TASK_ID", ""),
            "restart_count": int(e.get("SLURM_RESTART_COUNT", "0") or 0), "nodes": e.get("SLURM_JOB_NODELIST", ""),
            "time": time.time(), **extra}
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    with open(Path(run_dir) / JOBS_FILE, "a") as f:  # one write of one line: appends from several jobs interleave whole
        f.write(json.dumps(line) + "\n")


def read_jsonl(path: Path) -> list[dict]:
    """Lines of a JSONL file that are complete JSON objects (a writer may be mid-line)."""
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut by a kill
            pass
    return out


def timeline(run_dir: str | Path) -> list[dict]:
    """One row per job start: restart count, seconds to its first logged step, and for restarts the
    seconds from the requeue before it to that job start and to its first step."""
    run_dir = Path(run_dir)
    events = read_jsonl(run_dir / JOBS_FILE)
    times = sorted(m["time"] for m in read_jsonl(run_dir / "metrics.jsonl") if "time" in m)
    rows, last_requeue = [], None
    for e in events:
        if e["event"] == "requeue":
            last_requeue = e["time"]
        if e["event"] != "start":
            continue
        first = next((t for t in times if t > e["time"]), None)
        row = {"job_id": e["job_id"], "restart_count": e["restart_count"],
               "start_to_first_step_s": None if first is None else first - e["time"]}
        if last_requeue is not None:
            row["requeue_to_start_s"] = e["time"] - last_requeue
            row["requeue_to_first_step_s"] = None if first is None else first - last_requeue
            last_requeue = None
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print(__doc__.strip().splitlines()[-1].strip(), file=sys.stderr)
        return 2
    for row in timeline(argv[0]):
        print(json.dumps({k: round(v, 1) if isinstance(v, float) else v for k, v in row.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
