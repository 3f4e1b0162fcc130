"""Stops raised only where the main thread can be interrupted safely.

A Ctrl-C or SIGTERM is turned into an exception in the main thread (`cushing.cli.stops`). Raised at an arbitrary
point it can leave shared state broken for the threads that go on during the stop's clean-up (a sweep worker's
finisher ending the runs it holds, a trial's heartbeat):

- inside a write to an embedded SQLite store, the connection stays mid-transaction holding the file's lock, and the
  finisher's writes wait on it until its grace runs out: a trained run ends KILLED and is trained again;
- inside the standard library's `logging` (e.g. `Logger.setLevel`, which takes the module lock without a
  `try`/`finally`), the module lock stays held for good: every other thread that logs blocks forever, and the
  command hangs past any grace.

So a stop that arrives while the main thread is *busy* is held back: inside a block marked `held()` (the tracking
client's calls on an embedded store, opening a run), while it has a database connection checked out of a
SQLAlchemy pool (MLflow's and Optuna's stores; `guard_connections()`), or while it holds a `logging` lock. It is
raised as a held block ends, or at the first moment, checked every RECHECK_S seconds (SIGALRM), when the main
thread is no longer busy; at the latest after MAX_HOLD_S seconds, so a wedged call cannot swallow a stop.
Imports nothing of the package (the bottom layer).
"""
from __future__ import annotations

import logging
import signal
import threading
import time
from contextlib import contextmanager
from typing import Iterator

__all__ = ["held", "hold_back", "guard_connections", "RECHECK_S", "MAX_HOLD_S"]

RECHECK_S = 0.02
MAX_HOLD_S = 10.0

_depth = 0
_pending: BaseException | None = None
_since = 0.0
_connections: set[int] = set()  # the pool records whose connection the main thread has checked out
_guarded = False
_saved_alarm: tuple | None = None  # SIGALRM's handler and timer before a recheck was armed


def _main() -> bool:
    return threading.current_thread() is threading.main_thread()


def _logging_busy() -> bool:
    """The main thread holds the `logging` module lock or a handler's lock."""
    try:
        locks = [logging._lock, *(getattr(r(), "lock", None) for r in list(logging._handlerList))]
        return any(lock is not None and lock._is_owned() for lock in locks)
    except Exception:  # noqa: BLE001 - private names of the standard library: when they change, do not hold back
        return False


def _busy() -> bool:
    return _depth > 0 or bool(_connections) or _logging_busy()


def _hold_on() -> bool:
    """A pending stop waits longer: the main thread is still busy and the stop is not yet MAX_HOLD_S old."""
    return _busy() and time.monotonic() - _since < MAX_HOLD_S


def hold_back(exc: BaseException) -> bool:
    """For a signal handler: True when the main thread is busy (see the module's docstring), in which case `exc`
    is kept and raised as soon as it is not (the handler returns without raising)."""
    global _pending, _since
    if not _main() or not _busy():
        return False
    if _pending is None:
        _pending, _since = exc, time.monotonic()
    if _depth == 0:
        _arm()
    return True


def _arm() -> None:
    """Look again in RECHECK_S seconds (SIGALRM is delivered to the main thread, between two of its bytecodes).
    Whoever used SIGALRM before (pytest-timeout, say) gets its handler and what was left of its timer back."""
    global _saved_alarm
    previous = signal.signal(signal.SIGALRM, _recheck)
    left, _ = signal.setitimer(signal.ITIMER_REAL, RECHECK_S)
    if _saved_alarm is None:
        _saved_alarm = (previous, left, time.monotonic())


def _disarm() -> None:
    global _saved_alarm
    signal.setitimer(signal.ITIMER_REAL, 0)
    if _saved_alarm is None:
        return
    previous, left, at = _saved_alarm
    _saved_alarm = None
    signal.signal(signal.SIGALRM, previous if previous is not None else signal.SIG_DFL)
    if left > 0:
        signal.setitimer(signal.ITIMER_REAL, max(left - (time.monotonic() - at), 0.001))


def _recheck(signum, frame) -> None:
    if _pending is None:
        _disarm()
        return
    if _hold_on():
        signal.setitimer(signal.ITIMER_REAL, RECHECK_S)
        return
    _raise_pending()


def _raise_pending() -> None:
    global _pending
    _disarm()
    exc, _pending = _pending, None
    raise exc


@contextmanager
def held(active: bool = True) -> Iterator[None]:
    """A block during which a stop is held back (main thread only; elsewhere, or with `active` False, a no-op)."""
    global _depth
    if not active or not _main():
        yield
        return
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
        if _depth == 0 and _pending is not None:
            if _hold_on():
                _arm()
            else:
                _raise_pending()


def guard_connections() -> None:
    """Count the database connections the main thread has checked out of any SQLAlchemy pool (idempotent; imports
    SQLAlchemy, so call it where a store is opened, not at start-up)."""
    global _guarded
    if _guarded:
        return
    from sqlalchemy import event
    from sqlalchemy.pool import Pool

    def out(dbapi_connection, record, proxy) -> None:
        if _main():
            _connections.add(id(record))

    def back(dbapi_connection, record, *rest) -> None:  # the DB-API connection is None once invalidated
        _connections.discard(id(record))

    event.listen(Pool, "checkout", out)
    for name in ("checkin", "close", "detach", "invalidate"):
        event.listen(Pool, name, back)
    _guarded = True
