"""A full disk ends a run with one line naming the run directory and the space a checkpoint needs, leaves the
previous checkpoint and `latest` as they were, and a resume on the still-full disk says the same before it
starts. The disk is a real small tmpfs (mounting needs root; skipped otherwise), filled by a filler file."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from vqd_scale.data.random_shards import write_random_token_shards
from vqd_scale.train import checkpoint as C
from vqd_scale.train.disk_space import SKIP_SPACE_CHECK_ENV

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
BATCH = 8


@pytest.fixture
def tmpfs(tmp_path):
    mnt = tmp_path / "disk"
    mnt.mkdir()
    try:
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mnt)], check=True, capture_output=True)
    except (OSError, subprocess.CalledProcessError) as e:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {e}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def fill(mnt: Path, leave: int) -> None:
    """Grow or shrink mnt/filler so that `leave` bytes stay free."""
    filler = mnt / "filler"
    filler.unlink(missing_ok=True)
    free = shutil.disk_usage(mnt).free
    with open(filler, "wb") as f:
        f.truncate(0)
        f.write(b"\0" * max(0, free - leave))  # real blocks (tmpfs does not count holes)


def train(data: Path, run: Path, steps: int, *extra: str, env_extra=None) -> subprocess.CompletedProcess:
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", WANDB_MODE="disabled",
               PYTHONWARNINGS="ignore::FutureWarning", **(env_extra or {}))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS", SKIP_SPACE_CHECK_ENV):
        env.pop(k, None) if k not in (env_extra or {}) else None
    return subprocess.run([sys.executable, "-m", "vqd_scale.cli.train", str(REPO / "configs" / "tiny.yaml"),
                           f"run_dir={run}", f'data.sources=[{{name: r, shards: "{data}/{{00000..00001}}.tar"}}]',
                           f"data.manifest={data}/manifest.json", "model.height=4", "model.width=4",
                           f"data.batch_size={BATCH}", f"max_samples={steps * BATCH}", "checkpoint.every_steps=2",
                           "checkpoint.keep_last=3", "logging.every_steps=1", "logging.wandb_mode=disabled", *extra],
                          capture_output=True, text=True, timeout=600, cwd=REPO, env=env)


def _one_line_error(r: subprocess.CompletedProcess, run: Path) -> str:
    assert r.returncode == 2, r.stderr[-3000:]
    assert "Traceback" not in r.stderr and "SafetensorError" not in r.stderr, r.stderr[-3000:]
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("vqd-train: error:")]
    assert len(lines) == 1 and f"no disk space for a checkpoint in run directory {run}" in lines[0], r.stderr[-3000:]
    return lines[0]


def test_full_disk_stops_with_one_line_keeps_the_last_checkpoint_and_refuses_to_resume(tmpfs, tmp_path):
    """One disk, four runs (each launch costs more than its steps): a run that fits; a resume whose second save
    does not fit (the space check refuses it); a resume on the still-full disk (refused before it starts);
    a fresh run whose first save really runs into ENOSPC (the check turned off by its test hook)."""
    data = tmp_path / "data"
    write_random_token_shards(data, 2, 16, (4, 4), 32)
    run = tmpfs / "run"
    assert train(data, run, 2).returncode == 0
    size = C.checkpoint_bytes(run / "checkpoints" / "step_00000002")
    text = (run / C.TEXT_FILE).stat().st_size

    fill(tmpfs, size + size // 2)  # room for one more checkpoint, not two
    line = _one_line_error(train(data, run, 6), run)  # step 4 fits, step 6 does not
    assert f"needs about {size / 2**20:.1f} MiB" in line and "(step_00000004) and `latest` are intact" in line
    assert [s for s, _ in C.list_complete(run)] == [2, 4] and (run / "checkpoints" / "latest").read_text() == "step_00000004\n"
    assert not (run / "checkpoints" / "step_00000006").exists()
    C.load_weights(run / "checkpoints" / "step_00000004", "model")  # intact (its hashes are checked)

    again = _one_line_error(train(data, run, 6), run)  # the disk is still full: refused before it starts
    assert f"needs about {size / 2**20:.1f} MiB" in again and "step_00000004" in again

    fresh = tmpfs / "fresh"  # the text tower and the config fit, a checkpoint does not
    fill(tmpfs, text + size // 3 + (1 << 20))
    _one_line_error(train(data, fresh, 2, env_extra={SKIP_SPACE_CHECK_ENV: "1"}), fresh)
    assert C.list_complete(fresh) == [] and not (fresh / "checkpoints" / "latest").exists()
    assert not (fresh / "checkpoints" / "step_00000002").exists()  # the partial directory is removed
    assert [s for s, _ in C.list_complete(run)] == [2, 4]  # the other run directory is untouched
