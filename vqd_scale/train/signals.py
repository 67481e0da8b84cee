"""Preemption signals: the handler only sets a flag; the loop saves at the next step boundary and exits.

Saving inside a handler would run in the middle of a collective or an optimizer step. SIGUSR1 is
caught by NCCL on some setups, so SLURM scripts should prefer `--signal=B:USR2@T` (submitit #1697);
all three are handled. The process exits with EXIT_PREEMPTED so the batch script can requeue.
"""
from __future__ import annotations

import signal
from typing import Optional

EXIT_PREEMPTED = 42  # "checkpoint written after a signal; requeue me" (distinct from success/crash)
SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)


class StopFlag:
    """Remembers the first preemption signal received; installs and restores handlers."""

    def __init__(self) -> None:
        self.signum: Optional[int] = None
        self._previous: dict[int, object] = {}

    def _handler(self, signum, frame) -> None:  # noqa: ARG002 (signal API)
        if self.signum is None:
            self.signum = signum

    def install(self) -> "StopFlag":
        for s in SIGNALS:
            self._previous[s] = signal.signal(s, self._handler)
        return self

    def restore(self) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous.clear()

    @property
    def raised(self) -> bool:
        return self.signum is not None
