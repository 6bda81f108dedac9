"""Stopping a training run when asked, without losing it: SIGTERM (a scheduler's pre-emption notice) and
SIGINT (Ctrl-C) end the run after the update in flight, with a checkpoint of that update, so the same
command resumes to exactly the numbers of an uninterrupted run. A second signal stops at once.

One process: the signal sets a flag the loop reads after every update. Several processes must all save
the same update, yet each receives its signal at its own: JAX's distributed runtime has a pre-emption sync
point for this — its own SIGTERM handler tells the coordinator, and ``reached_preemption_sync_point``
then answers True on every process at the same next update. So SIGTERM is left to that handler there, and
a Ctrl-C is passed on to it as a SIGTERM to this process.
"""
from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading

EXIT_STATUS = {signal.SIGTERM: 0, signal.SIGINT: 130}  # the scheduler asked (done as asked); a user stopped it


class Interrupted(SystemExit):
    """A second stop signal: leave now, through the ``finally`` blocks that stop worker processes."""


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name


class StopSignals:
    """The stop signals received so far; ``reached(update)`` says whether to save and stop after ``update``."""

    def __init__(self, synced: bool = False):
        self.synced = synced   # several processes: agree through JAX's pre-emption sync point
        self.received: int | None = None

    def handle(self, signum: int, frame=None) -> None:
        del frame
        if self.received is not None:
            raise Interrupted(128 + signum)
        self.received = signum
        print(f"\n{signal_name(signum)}: finishing the update in flight and saving it "
              f"(again to stop at once)", file=sys.stderr, flush=True)
        if self.synced:
            os.kill(os.getpid(), signal.SIGTERM)  # to JAX's handler, which tells every process

    def reached(self, update: int) -> bool:
        """Every process must call this after every update, with the same numbers, when ``synced``."""
        if not self.synced:
            return self.received is not None
        from jax.experimental import multihost_utils
        if not multihost_utils.reached_preemption_sync_point(update):
            return False
        self.received = self.received or signal.SIGTERM  # another process's, or JAX's handler's here
        return True

    @property
    def exit_status(self) -> int:
        return EXIT_STATUS.get(self.received, 128 + (self.received or 0))


@contextlib.contextmanager
def stop_on_signals(synced: bool = False):
    """A StopSignals receiving SIGINT (and SIGTERM, unless ``synced``) inside the block; outside the main
    thread, where Python cannot take signals, one that never stops."""
    stops = StopSignals(synced)
    if threading.current_thread() is not threading.main_thread():
        yield stops
        return
    handled = (signal.SIGINT,) if synced else (signal.SIGINT, signal.SIGTERM)
    previous = {s: signal.signal(s, stops.handle) for s in handled}
    try:
        yield stops
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)


def exit_on_sigterm() -> None:
    """SIGTERM as an exception (exit status 143) instead of sudden death, so that every command's
    ``finally`` blocks run: they stop the worker processes and close files."""
    def handler(signum, frame):
        del frame
        raise Interrupted(128 + signum)
    signal.signal(signal.SIGTERM, handler)
