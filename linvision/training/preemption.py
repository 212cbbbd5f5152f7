"""Preemption: SIGTERM / SIGUSR1 become a request to checkpoint and stop at the next optimizer update.

Clusters warn a job before killing it: SLURM sends the signal chosen with ``--signal=USR1@120``
(or SIGTERM at the time limit, then SIGKILL after ``KillWait``), Kubernetes and most schedulers
SIGTERM, and torchrun forwards a SIGTERM it receives to its workers. The handler only records the
signal; the training loop finishes the step in progress, writes a checkpoint set (atomically, as
every set) and returns, and the tool exits with status 0, so that the same command with
``--resume auto`` continues from that exact batch.

Under torchrun the ranks must agree on the update at which they stop (the checkpoint is a
collective), and a signal may reach them at different moments. Every :data:`POLL_UPDATES`
updates, and at every epoch end, they take the maximum of their flags (one tiny all-reduce), so
all of them stop at the same update. One process polls its flag at every update, for free.
"""
import signal
import threading
from typing import Optional

from .distributed import DistEnv

__all__ = ["PreemptionHandler", "STOP_SIGNALS", "POLL_UPDATES"]

STOP_SIGNALS = ("SIGTERM", "SIGUSR1")
# Updates between the flag all-reduces of a distributed run: frequent enough to stop within seconds
# of a signal, rare enough that the host synchronisation it costs does not show in the step time.
POLL_UPDATES = 10


class PreemptionHandler:
    """Context manager that turns :data:`STOP_SIGNALS` into a stop request while it is active.

    Handlers can only be installed from the main thread; elsewhere (a training run inside a worker
    thread) the handler stays inactive and signals keep their previous behaviour. DataLoader worker
    processes forked while it is active inherit the handler: a signal sent to the whole process
    group only sets their (unused) flag instead of killing them.
    """

    def __init__(self, env: DistEnv):
        self.env = env
        self.received: Optional[str] = None
        self._previous = {}

    def __enter__(self) -> "PreemptionHandler":
        if threading.current_thread() is threading.main_thread():
            for name in STOP_SIGNALS:
                sig = getattr(signal, name, None)
                if sig is not None:
                    self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous = {}

    def _handle(self, signum, frame) -> None:
        self.received = signal.Signals(signum).name

    def should_stop(self, num_updates: Optional[int] = None) -> bool:
        """Whether to stop now. Every rank must call it at the same points (an update count, or an
        epoch end with ``num_updates=None``); in a distributed run the answer is the same on all."""
        if not self.env.distributed:
            return self.received is not None
        if num_updates is not None and num_updates % POLL_UPDATES:
            return False
        return self.env.max_int(int(self.received is not None)) > 0

    @property
    def signal_name(self) -> str:
        """The signal this process received, or a note that another rank received it."""
        return self.received or "a stop signal on another rank"
