"""Preemption signals: the handler only sets a flag; the loop saves at the next step boundary and exits.

Saving inside a handler would run in the middle of a collective or an optimizer step. SIGUSR1 is
caught by NCCL on some setups, so SLURM scripts should prefer `--signal=B:USR2@T` (submitit #1697);
all three are handled. The process exits with EXIT_PREEMPTED so the batch script can requeue (whether
it does is the launcher's decision: slurm/common.sh never requeues a job that got SIGTERM, which is a
`scancel`, SLURM's own requeue or the end of the time limit).

`install_early()` runs first thing in vqd-train, before torch and DeepSpeed are imported: a signal
that arrives during those seconds is remembered and handed to the loop's StopFlag, instead of
killing the process with the default action.
"""
from __future__ import annotations

import signal
from typing import Optional

EXIT_PREEMPTED = 42  # "checkpoint written after a signal; requeue me" (distinct from success/crash)
SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)

_early: Optional[int] = None  # first signal caught by the early handler, not yet taken by a StopFlag


def _early_handler(signum, frame) -> None:  # noqa: ARG001 (signal API)
    global _early
    if _early is None:
        _early = signum


def install_early() -> None:
    """Remember preemption signals from now on; the first StopFlag installed takes the one caught.

    The early handler stays in place after a StopFlag is restored, so a signal while the process
    tears down (after the last checkpoint) cannot kill it and turn a finished run into a failure.
    """
    for s in SIGNALS:
        signal.signal(s, _early_handler)


class StopFlag:
    """Remembers the first preemption signal received; installs and restores handlers."""

    def __init__(self) -> None:
        self.signum: Optional[int] = None
        self._previous: dict[int, object] = {}

    def _handler(self, signum, frame) -> None:  # noqa: ARG002 (signal API)
        if self.signum is None:
            self.signum = signum

    def install(self) -> "StopFlag":
        global _early
        for s in SIGNALS:
            self._previous[s] = signal.signal(s, self._handler)
        if _early is not None and self.signum is None:  # caught before this flag existed
            self.signum, _early = _early, None
        return self

    def restore(self) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous.clear()

    @property
    def raised(self) -> bool:
        return self.signum is not None
