"""Preemption: what Slurm and Kubernetes send before they kill a job, and the exit status that asks to requeue.

Slurm (`#SBATCH --signal=B:USR1@120`, or `scancel --signal=TERM`) and Kubernetes (SIGTERM, then SIGKILL after
`terminationGracePeriodSeconds`) warn a process before killing it. While a run trains, `PreemptionWatch`
turns SIGTERM and SIGUSR1 into a flag; the trainer looks at it at its safe points (after each optimizer step,
after each sampling batch, after each epoch), writes a whole checkpoint there and raises `Preempted`, which
`ddpo train` turns into exit status `REQUEUE_EXIT_STATUS`. `ddpo train --resume auto --out RUN_DIR` then
continues from that checkpoint exactly where the run stopped (docs/scaling.md has a Slurm script).
"""

from __future__ import annotations

import signal
import sys
import threading

REQUEUE_EXIT_STATUS = 75
"""Exit status of a run stopped by SIGTERM/SIGUSR1 after writing its checkpoint: EX_TEMPFAIL of sysexits.h,
"a temporary failure; the user is invited to retry". Any other non-zero status is a failure not worth requeueing."""
PREEMPTION_SIGNALS = ("SIGTERM", "SIGUSR1")


class Preempted(Exception):
    """The run stopped on a preemption signal after writing `checkpoint`; rerun with `--resume auto` to continue."""

    def __init__(self, signal_name: str, checkpoint: str, epoch: int, where: str) -> None:
        self.signal_name, self.checkpoint, self.epoch, self.where = signal_name, checkpoint, epoch, where
        super().__init__(f"{signal_name} received {where}; checkpoint {checkpoint} written; continue with --resume auto (exit status {REQUEUE_EXIT_STATUS}: requeue)")


class PreemptionWatch:
    """A context manager: while inside, SIGTERM and SIGUSR1 set `received` (the signal's name) instead of
    killing the process. Outside the main thread (where Python cannot install handlers) it watches nothing."""

    def __init__(self, announce=None) -> None:
        self.received: str | None = None
        self._announce = announce or (lambda message: print(message, file=sys.stderr, flush=True))
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame) -> None:  # noqa: ARG002 - the signal module's signature
        if self.received is None:
            self.received = signal.Signals(signum).name
            self._announce(f"ddpo: {self.received} received: finishing the current step, then writing a checkpoint")

    def __enter__(self) -> "PreemptionWatch":
        if threading.current_thread() is threading.main_thread():
            for name in PREEMPTION_SIGNALS:
                number = getattr(signal, name, None)
                if number is not None:  # SIGUSR1 does not exist on Windows
                    self._previous[number] = signal.signal(number, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous.clear()
