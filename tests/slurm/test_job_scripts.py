"""The slurm/*.sh job parameters without a cluster: overrides with spaces (file or quoted), and bad
values as one ERROR line + exit 2 before anything starts (run with bash: the checks come before srun)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from slurm_helpers import REPO
from vqd_scale.config import ConfigError
from vqd_scale.families import load_config
from vqd_scale.launch import TORCH_EXTENSIONS_DIR
from vqd_scale.launch.jobargs import overrides_from_env, split_words, train_args

SOURCES = 'data.sources=[{name: syn, shards: "data/syn_tok/{00000..00003}.tar"}]'  # README's own override


def test_overrides_with_spaces_from_a_file_or_quoted(tmp_path):
    f = tmp_path / "overrides.txt"
    f.write_text(f"# one per line, verbatim\n{SOURCES}\n\n  data.manifest=data/syn_tok/manifest.json\n")
    quoted = f"optim.lr=3e-4 '{SOURCES}'"
    got = overrides_from_env({"OVERRIDES_FILE": str(f), "OVERRIDES": quoted})
    assert got == [SOURCES, "data.manifest=data/syn_tok/manifest.json", "optim.lr=3e-4", SOURCES]
    assert split_words("optim.lr=3e-4  deepspeed.zero_stage=3", "OVERRIDES") == \
        ["optim.lr=3e-4", "deepspeed.zero_stage=3"]  # plain space-separated overrides as before
    cfg = load_config(REPO / "configs" / "tiny.yaml", got)  # what vqd-train receives parses as meant
    assert [(s.name, s.shards) for s in cfg.data.sources] == [("syn", "data/syn_tok/{00000..00003}.tar")]
    run_dir, *words = train_args(str(REPO / "configs" / "tiny.yaml"), {"OVERRIDES": quoted, "RUN_DIR": "runs/x"})
    assert run_dir == "runs/x" and words == ["optim.lr=3e-4", SOURCES]
    with pytest.raises(ConfigError, match="No closing quotation"):
        split_words("'data.sources=[", "OVERRIDES")


def test_check_before_queueing(tmp_path):
    """What the job checks first, run by hand before sbatch (README)."""
    env = {k: v for k, v in os.environ.items() if k not in ("RUN_DIR", "OVERRIDES", "OVERRIDES_FILE")}
    cmd = [sys.executable, "-m", "vqd_scale.launch.jobargs", "check"]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=60,
                       env=dict(env, CONFIG="configs/tiny.yaml", OVERRIDES=f"optim.lr=3e-4 '{SOURCES}'"))
    assert r.returncode == 0 and r.stdout.splitlines() == [
        "ok: configs/tiny.yaml with 2 override(s), run_dir runs/tiny", "optim.lr=3e-4", SOURCES], r
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=60,
                       env=dict(env, CONFIG="configs/tiny.yaml", OVERRIDES="optim.bogus=1"))
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "bogus" in r.stderr, r.stderr


def _script(script: str, tmp_path, **env: str) -> subprocess.CompletedProcess:
    """Run a batch script with bash outside SLURM (its checks come first), from the repository root."""
    e = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k not in ("RUN_DIR", "OVERRIDES")}
    e.update(VQD_ROOT=str(REPO), PYTHON=sys.executable, VQD_DEVICE="cpu", **env)
    return subprocess.run(["bash", f"slurm/{script}"], cwd=REPO, env=e, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("case", ["yaml", "override", "quote", "file"])
def test_train_script_refuses_bad_parameters_in_one_line(case, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("max_samples: [1, 2\nseed: 3\n")
    env = {"yaml": dict(CONFIG=str(bad)),  # RUN_DIR unset: the run_dir comes from the (broken) config
           "override": dict(CONFIG="configs/tiny.yaml", OVERRIDES="optim.lr=-1"),
           "quote": dict(CONFIG="configs/tiny.yaml", OVERRIDES=f"'{SOURCES}"),
           "file": dict(CONFIG="configs/tiny.yaml", RUN_DIR=str(tmp_path / "r"), OVERRIDES_FILE=str(tmp_path / "no"))}
    r = _script("train_laion.sh", tmp_path, **env[case])
    want = {"yaml": "YAML syntax error", "override": "optim.lr", "quote": "No closing quotation",
            "file": "OVERRIDES_FILE="}[case]
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ERROR: ") and want in lines[0], r.stderr
    assert not (tmp_path / "r").exists()


def test_eval_script_refuses_bad_parameters_in_one_line(tmp_path):
    r = _script("eval.sh", tmp_path)
    assert r.returncode == 2 and r.stderr.strip() == "ERROR: set RUN_DIR to the training run directory to evaluate"
    r = _script("eval.sh", tmp_path, RUN_DIR=str(tmp_path / "missing"))  # --once needs the run now
    assert r.returncode == 2 and "does not exist" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = _script("eval.sh", tmp_path, RUN_DIR=str(tmp_path), EVAL_ARGS="'eval.num_samples=8")
    assert r.returncode == 2 and r.stderr.strip().startswith("ERROR: EVAL_ARGS=") and "Traceback" not in r.stderr


def test_torch_extensions_dir_is_the_same_for_sbatch_and_submitit():
    """DeepSpeed's CPU op is compiled once (minutes) for every launcher: one cache directory."""
    text = (REPO / "slurm" / "common.sh").read_text()
    assert TORCH_EXTENSIONS_DIR.startswith("~/")
    assert f'TORCH_EXTENSIONS_DIR="${{TORCH_EXTENSIONS_DIR:-$HOME/{TORCH_EXTENSIONS_DIR[2:]}}}"' in text


def test_corgi_script_submits_prior_decoder_and_chain_watcher(tmp_path):
    """slurm/train_corgi.sh: three sbatch calls with the job parameters, the watcher after the prior; a bad
    override stops it before anything is queued."""
    bin_dir, log = tmp_path / "bin", tmp_path / "sbatch.log"
    bin_dir.mkdir()
    fake = bin_dir / "sbatch"  # records its environment's job parameters and arguments, answers a job id
    fake.write_text(f'#!/bin/bash\necho "CONFIG=$CONFIG RUN_DIR=$RUN_DIR EVAL_ARGS=$EVAL_ARGS ARGS=$*" >> {log}\n'
                    f'echo $(( $(wc -l < {log}) + 100 ))\n')
    fake.chmod(0o755)
    path = f"{bin_dir}:{os.environ['PATH']}"
    r = _script("train_corgi.sh", tmp_path, PATH=path, DECODER_RUN=str(tmp_path / "dec"), DECODER_SBATCH="--nodes=2")
    assert r.returncode == 0, (r.stdout, r.stderr)
    prior, dec, ev = log.read_text().splitlines()
    assert prior.startswith("CONFIG=configs/cc15m_prior.yaml RUN_DIR=runs/cc15m_prior ")
    assert prior.endswith("slurm/train_cc15m_prior.sh")
    assert dec.startswith(f"CONFIG=configs/laion_decoder.yaml RUN_DIR={tmp_path / 'dec'} ")
    assert dec.endswith("--job-name=vqd-laion-decoder --nodes=2 slurm/train_laion.sh")
    assert f"RUN_DIR={tmp_path / 'dec'} EVAL_ARGS=--wait-for-run 86400 eval.prior_run=runs/cc15m_prior" in ev
    assert "--dependency=after:101 --begin=now+2hours slurm/eval.sh" in ev
    assert "prior job 101" in r.stdout and "decoder job 102" in r.stdout and "watcher 103" in r.stdout
    log.unlink()
    r = _script("train_corgi.sh", tmp_path, PATH=path, PRIOR_OVERRIDES="optim.lr=-1")
    assert r.returncode == 2 and r.stderr.strip().startswith("ERROR: ") and "optim.lr" in r.stderr, r.stderr
    assert not log.exists()  # nothing queued
