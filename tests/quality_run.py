"""The learning test's training run, started in the background when the session collects it.

The demo recipe needs its full budget to learn (accuracy takes off after ~60k samples: at 24k and 48k
samples it is still at chance), about 5 minutes of one CPU core. Started as soon as collection ends,
it runs beside the rest of the suite (one thread; the SLURM tests mostly wait on the scheduler) and
`tests/test_quality.py` waits for it.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BUDGET = 80_000  # the demo's default budget (training samples)
OVERRIDES = ["logging.wandb_mode=disabled", "checkpoint.every_steps=100000"]
_run: dict = {}

SCRIPT = """
import sys
from pathlib import Path
sys.path.insert(0, {tools!r})
import demo
demo.quiet_env()
root = Path({root!r})
demo.prepare_data(root)
demo.train(root, root / "run", {budget}, {overrides!r}, quiet=True)
"""


def start() -> None:
    """Prepare the demo data and train the demo recipe in a child process (idempotent)."""
    if _run:
        return
    root = Path(tempfile.mkdtemp(prefix="vqd_quality_"))
    log = open(root / "train.log", "w")  # noqa: SIM115 (the child writes it until stop() closes it)
    code = SCRIPT.format(tools=str(REPO / "tools"), root=str(root), budget=BUDGET, overrides=OVERRIDES)
    _run.update(root=root, log=log, proc=subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=log,
                                                          stderr=subprocess.STDOUT))


def wait(timeout: float) -> Path:
    """Block until the run ends; its root (data, tokenizer, run/) or an error with the log's tail."""
    start()
    proc: subprocess.Popen = _run["proc"]
    try:
        rc = proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        rc = "timeout"
    _run["log"].flush()
    if rc != 0:
        tail = (_run["root"] / "train.log").read_text()[-3000:]
        raise AssertionError(f"the demo-recipe training run failed ({rc}):\n{tail}")
    return _run["root"]


def stop() -> None:
    """Kill a run still going (session end) and remove its files."""
    proc: subprocess.Popen | None = _run.get("proc")
    if proc is not None and proc.poll() is None:
        proc.kill()
        proc.wait()
    if _run:
        _run["log"].close()
        shutil.rmtree(_run["root"], ignore_errors=True)
        _run.clear()
