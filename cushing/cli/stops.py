"""Stops: SIGTERM handled like Ctrl-C (the run ends KILLED), later signals ignored until the cleanup is done, and
one line instead of a traceback saying what stopped and how to continue it."""
from __future__ import annotations

import signal
import sys

__all__ = ["Terminated"]


class Terminated(KeyboardInterrupt):
    """SIGTERM (docker stop, a scheduler, a CI timeout), handled like Ctrl-C: the run ends KILLED."""

    def __init__(self, signum: int):
        super().__init__()
        self.signame = signal.Signals(signum).name


def _on_signal(signum, frame) -> None:
    """The first SIGINT or SIGTERM stops the command; later ones are ignored, so the cleanup they would cut short
    (ending the run KILLED, telling Optuna the trial's fate, a launcher waiting for its workers) always finishes.
    A terminal's Ctrl-C reaches every process of its group at once, and schedulers follow SIGTERM with more."""
    for sig in (signal.SIGINT, signal.SIGTERM):  # a Python no-op, not SIG_IGN: a signal already pending when the
        signal.signal(sig, _ignore)  # handler changes to SIG_IGN is raised as "OSError: ignored due to race condition"
    from cushing.interrupts import hold_back

    exc = KeyboardInterrupt() if signum == signal.SIGINT else Terminated(signum)
    if hold_back(exc):  # inside a store write: raised as the write returns (cushing/interrupts.py)
        return
    raise exc


def _ignore(signum, frame) -> None:
    pass


def _ignore_until_exit() -> None:
    """After the cleanup: SIG_IGN proper, so interpreter shutdown (which puts SIG_DFL back in place of Python
    handlers) cannot be killed by a late signal. One that lands while switching is dropped with its OSError."""
    try:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)
        _ignore(0, None)  # entering a Python function runs the pending-signal check inside this try
    except OSError:
        pass


def _resume_hint(run: str) -> str:
    from cushing.model.checkpoint import has_local_checkpoint
    from cushing.tracking import get_run

    try:
        saved = has_local_checkpoint(run) or "checkpoint_epoch" in get_run(run).tags
    except Exception:  # the tracking store went away too: say what is certain
        saved = has_local_checkpoint(run)
    if saved:
        return f" (continue it from its last checkpoint: cushing train --resume {run})"
    return " (it stopped before its first checkpoint, see checkpoint_minutes: train it again)"


def _stopped(command: str, e: KeyboardInterrupt) -> int:
    """One line instead of a traceback: what stopped, which run is KILLED, how to continue it."""
    name = getattr(e, "signame", "SIGINT")
    run = getattr(e, "cushing_run", None)
    where = f"; run {run} is marked KILLED" if run else ""
    hint = _resume_hint(run) if run and command == "train" else ""
    print(f"cushing {command}: stopped by {name}{where}{hint}", file=sys.stderr)
    return 128 + (signal.SIGTERM if name == "SIGTERM" else signal.SIGINT)
