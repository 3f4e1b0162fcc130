"""Stops, cooperatively: a signal handler only records the signal; the code stops at safe points it owns.

Ctrl-C (SIGINT), SIGTERM (a scheduler, `docker stop`) and Slurm's preemption signal (SIGUSR2, see
`workflows/cluster/task.py`) take one path, as in Lightning, Marian or submitit: the first signal asks for a stop,
a second means now. Inside `cooperative()` (a run, a sweep worker, the pipeline, face extraction, the audit's
signatures) the handler only records the signal, and the code calls `check()` at safe points (between batches and
epochs, Grad-CAM batches, decode chunks, photos, sweep configurations and pipeline steps): it raises `Stopped`
there, inside the scope of the run being stopped, so the run ends KILLED and says how to resume; leaving the scope
with a stop unanswered raises it there. No timer is touched, so a stop never lands inside a store write, a lock or a
library call. Outside every scope the first signal raises `Stopped` at once, as Python's own Ctrl-C does: code with
no safe points stays stoppable. Standard library only (the bottom layer)."""
from __future__ import annotations

import signal
import time
from contextlib import contextmanager
from typing import Iterator

__all__ = ["Stopped", "install", "cooperative", "requested", "now", "check", "wait", "grace", "reset", "exit_code"]


class Stopped(KeyboardInterrupt):
    """Raised at a safe point after a stop signal; `signame` says which (SIGINT, SIGTERM, SIGUSR2)."""

    def __init__(self, signame: str):
        super().__init__(signame)
        self.signame = signame


_seen: list[str] = []  # the signals received, in order (the handler only appends: it takes no lock)
_depth = 0  # how many cooperative() scopes the main thread is in


def _on_signal(signum: int, frame) -> None:
    _seen.append(signal.Signals(signum).name)
    if not _depth and len(_seen) == 1:  # later signals never raise: they must not cut a stop's clean-up short
        raise Stopped(_seen[0])


@contextmanager
def cooperative() -> Iterator[None]:
    """A block whose code has safe points: a signal inside it is only recorded, and answered at the next `check()`
    (or at the block's end). Nests."""
    global _depth
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
    check()


def install(*names: str) -> None:
    """Handle these signals (default SIGINT and SIGTERM) cooperatively in this process. Call it from the main thread.
    A SIGINT that the parent ignores (a background job, nohup) stays ignored."""
    for name in names or ("SIGINT", "SIGTERM"):
        sig = getattr(signal, name)
        if sig == signal.SIGINT and signal.getsignal(sig) is signal.SIG_IGN:
            continue
        signal.signal(sig, _on_signal)


def requested() -> str | None:
    """The first stop signal's name, or None while nothing asked this process to stop."""
    return _seen[0] if _seen else None


def now() -> bool:
    """A second signal came: every grace period is over."""
    return len(_seen) > 1


def check() -> None:
    """A safe point: raise `Stopped` when a stop was asked."""
    if _seen:
        raise Stopped(_seen[0])


def _sleep_until(seconds: float, done) -> bool:
    deadline = time.monotonic() + max(0.0, seconds)
    while not done():
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        time.sleep(min(0.05, left))
    return True


def wait(seconds: float) -> bool:
    """Sleep up to `seconds`, less when a stop is asked (True then)."""
    return _sleep_until(seconds, lambda: bool(_seen))


def grace(seconds: float) -> bool:
    """Sleep up to `seconds` of a stop's clean-up, less when a second signal says now (True then)."""
    return _sleep_until(seconds, now)


def reset() -> None:
    """Forget the signals seen (tests; a long-lived process that handled a stop and goes on)."""
    _seen.clear()


def exit_code(signame: str) -> int:
    """The shell's convention: 128 + the signal's number (130 for Ctrl-C, 143 for SIGTERM)."""
    return 128 + int(getattr(signal, signame, signal.SIGINT))
