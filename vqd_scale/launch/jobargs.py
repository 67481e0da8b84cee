"""Job parameters of the slurm/*.sh scripts, parsed and checked here before anything starts.

    python -m vqd_scale.launch.jobargs train CONFIG    # env RUN_DIR, OVERRIDES, OVERRIDES_FILE
    python -m vqd_scale.launch.jobargs split NAME      # the words of the environment variable NAME
    python -m vqd_scale.launch.jobargs check [CONFIG]  # `train` for a person, before sbatch (CONFIG or $CONFIG)

`train` loads and validates CONFIG with the overrides (and RUN_DIR, when set, as a last `run_dir=`)
and writes the run directory followed by the overrides; `split` writes the words. Words are NUL-terminated
(bash: `mapfile -d '' -t ARR < file`); `check` prints them one per line. On a user error it prints
one line and exits 2.

Overrides come from OVERRIDES_FILE (one override per line, verbatim as on the vqd-train command
line; blank lines and lines starting with # are skipped), then OVERRIDES, which is split like a
shell command line: quote an override that contains spaces, e.g.
`OVERRIDES="optim.lr=3e-4 'data.sources=[{name: syn, shards: \\"d/{0..3}.tar\\"}]'"`.
"""
from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path
from typing import Mapping, Optional

from vqd_scale.config import ConfigError
from vqd_scale.families import load_config


def split_words(text: str, name: str) -> list[str]:
    """`text` split like a shell command line (quotes group words; no expansion of any kind)."""
    try:
        return shlex.split(text)
    except ValueError as e:  # "No closing quotation", "No escaped character"
        raise ConfigError(f"{name}={text!r}: {e} (quote each override that contains spaces)") from None


def read_overrides_file(path: str | os.PathLike) -> list[str]:
    """One override per line, verbatim; blank lines and # comments skipped."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as e:
        raise ConfigError(f"OVERRIDES_FILE={path}: {e.strerror or e}") from None
    return [ln.strip() for ln in lines if ln.strip() and not ln.strip().startswith("#")]


def overrides_from_env(env: Mapping[str, str]) -> list[str]:
    """OVERRIDES_FILE's lines, then the words of OVERRIDES."""
    out = read_overrides_file(env["OVERRIDES_FILE"]) if env.get("OVERRIDES_FILE") else []
    return out + split_words(env.get("OVERRIDES", ""), "OVERRIDES")


def train_args(config: str, env: Mapping[str, str]) -> list[str]:
    """[run_dir, *overrides] for `vqd-train CONFIG OVERRIDES run_dir=RUN_DIR`, after validating that
    config; run_dir is RUN_DIR when set (it wins over one in the overrides), else the config's."""
    overrides = overrides_from_env(env)
    cfg = load_config(config, overrides + ([f"run_dir={env['RUN_DIR']}"] if env.get("RUN_DIR") else []))
    return [cfg.run_dir, *overrides]


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["check"] and len(argv) == 1 and os.environ.get("CONFIG"):
        argv = ["check", os.environ["CONFIG"]]
    if len(argv) != 2 or argv[0] not in ("train", "split", "check"):
        print("\n".join(ln.strip() for ln in __doc__.strip().splitlines()[2:5]), file=sys.stderr)
        return 2
    try:
        if argv[0] in ("train", "check"):
            words = train_args(argv[1], os.environ)
        else:
            words = split_words(os.environ.get(argv[1], ""), argv[1])
    except ConfigError as e:
        print(f"ERROR: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    if argv[0] == "check":
        print(f"ok: {argv[1]} with {len(words) - 1} override(s), run_dir {words[0]}", *words[1:], sep="\n")
    else:
        sys.stdout.write("".join(w + "\0" for w in words))
    return 0


if __name__ == "__main__":
    sys.exit(main())
