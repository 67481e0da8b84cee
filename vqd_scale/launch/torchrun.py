"""`python -m vqd_scale.launch.torchrun [torchrun options] -m vqd_scale.cli.train ...`: torchrun whose exit
code is that of the worker that ended the run.

torchrun exits 1 whenever a worker exits non-zero, so a pre-empted run (every worker checkpoints and
exits 42) could not be told from a crash by a requeue script; and once the first worker has exited,
torchrun SIGTERMs the others, so a slower one may end by that signal. The code returned here is that of
the first worker that exited by itself (signal deaths are torchrun's teardown unless every worker died
by one): 42 pre-empted, 3 a non-finite loss, 2 a refused configuration, 1 a crash. Arguments are
torchrun's own.
"""
from __future__ import annotations

import sys
from typing import Optional, Sequence

from vqd_scale.train.signals import EXIT_PREEMPTED


def exit_code(failures: dict) -> int:
    """The exit status of the first worker that exited by itself (a signal s as 128 + s, like a shell)."""
    own = [f for _, f in sorted(failures.items()) if f.exitcode > 0] or [f for _, f in sorted(failures.items())]
    code = int(min(own, key=lambda f: f.timestamp).exitcode)  # ties (1 s resolution): the lowest rank
    return 128 - code if code < 0 else code


def main(argv: Optional[Sequence[str]] = None) -> int:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun

    try:
        torchrun(list(sys.argv[1:] if argv is None else argv))
    except ChildFailedError as e:
        code = exit_code(e.failures)
        what = "pre-empted: requeue" if code == EXIT_PREEMPTED else "of the first worker to stop"
        print(f"vqd_scale.launch.torchrun: exit code {code} ({what})", file=sys.stderr, flush=True)
        return code
    return 0


if __name__ == "__main__":
    sys.exit(main())
