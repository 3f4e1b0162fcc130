"""Stops held back for the length of a store write.

A Ctrl-C or SIGTERM is turned into an exception in the main thread wherever it happens to be (`cushing.cli.stops`).
Raised inside a write to an embedded SQLite store, it can leave that connection in the middle of a transaction,
holding the file's lock, while the stop's own clean-up (a sweep worker's finisher ending the runs it holds) waits on
that lock: the finisher then runs out of its grace and a trained run ends KILLED and is trained again. So the main
thread marks its short store writes (`held()`), and a stop that arrives inside one is raised as the write returns.
Imports nothing of the package (the bottom layer).
"""
from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Iterator

__all__ = ["held", "hold_back"]

_depth = 0
_pending: BaseException | None = None


def hold_back(exc: BaseException) -> bool:
    """For a signal handler: True when the main thread is inside a held write, in which case `exc` is kept and
    raised when the write ends (the handler returns without raising)."""
    global _pending
    if _depth > 0 and threading.current_thread() is threading.main_thread():
        _pending = _pending or exc
        return True
    return False


@contextmanager
def held(active: bool = True) -> Iterator[None]:
    """A block during which a stop is held back (main thread only; elsewhere, or with `active` False, a no-op)."""
    global _depth, _pending
    if not active or threading.current_thread() is not threading.main_thread():
        yield
        return
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
        if _depth == 0 and _pending is not None:
            exc, _pending = _pending, None
            raise exc
