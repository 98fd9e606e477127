"""SIGINT and SIGTERM while training: every rank stops after the same step, a checkpoint is
written, and the job ends in one line with the signal's exit status (130, 143).

Ctrl-C sends SIGINT to every process of the terminal's group; a scheduler (Slurm, Kubernetes,
torchrun stopping its ranks) sends SIGTERM and kills after a grace period (torchrun: 30 s,
Slurm: ``KillWait``, Kubernetes: ``terminationGracePeriodSeconds``). While training, a signal
only sets a flag; after each step the ranks take the largest flag (one integer all-reduced on
the host), so a signal that reached one rank stops all of them at the same step. A second
signal stops the process at once (``KeyboardInterrupt``), without a checkpoint.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType

from mqsa_core.collectives import max_over_ranks

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(Exception):
    """Training stopped on a signal; the message is the job's one line."""

    def __init__(self, signum: int, message: str) -> None:
        super().__init__(message)
        self.signum = signum

    @property
    def exit_status(self) -> int:
        return 128 + self.signum


class StopRequests:
    """A context in which SIGINT and SIGTERM only ask training to stop (module docstring)."""

    def __init__(self) -> None:
        self.received = 0
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopRequests:
        if threading.current_thread() is threading.main_thread():
            for signum in SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received:
            raise KeyboardInterrupt  # the second signal: stop now
        self.received = signum

    def agreed(self) -> int:
        """The signal any rank received (0: none). Collective: call after the same step on
        every rank."""
        return max_over_ranks(self.received)


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name
