"""Named wall-clock phases of a run, recorded where the work happens: the run's own timer, not a re-creation.

A `PhaseTimer` is made current for a block (`with timing() as timer:`); code anywhere below marks its work with
`phase("name")`, a no-op when no timer is current (library use, tests). A phase's seconds exclude the phases
nested in it, so the rows add up to the timed span; what no phase covers shows as `other (not in a phase)`.
The current timer lives in a context variable: another thread has its own. Standard library only: every command
can import it for free."""
from __future__ import annotations

import contextvars
import json
import os
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Iterator

__all__ = ["PhaseTimer", "phase", "timing", "current", "phased", "process_start_time", "OTHER", "PHASES_OUT_ENV"]

OTHER = "other (not in a phase)"
PHASES_OUT_ENV = "CUSHING_PHASES_OUT"  # a run started with this set writes its phase table there as JSON

_CURRENT: contextvars.ContextVar["PhaseTimer | None"] = contextvars.ContextVar("cushing_phase_timer", default=None)


@dataclass
class PhaseTimer:
    """Own seconds per phase name (in the order first seen), between `start` and `end` (unix seconds)."""

    start: float = field(default_factory=time.time)
    end: float | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    _t0: float = field(default_factory=time.perf_counter, repr=False)
    _stack: list[list] = field(default_factory=list, repr=False)  # [name, perf start, seconds of nested phases]

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        self._stack.append([name, time.perf_counter(), 0.0])
        try:
            yield
        finally:
            _, started, nested = self._stack.pop()
            spent = time.perf_counter() - started
            self.seconds[name] = self.seconds.get(name, 0.0) + spent - nested
            if self._stack:
                self._stack[-1][2] += spent

    def stop(self) -> "PhaseTimer":
        self.end = self.start + (time.perf_counter() - self._t0)
        return self

    @property
    def wall(self) -> float:
        """Seconds from start to stop (or to now, while running)."""
        return (self.end - self.start) if self.end is not None else time.perf_counter() - self._t0

    def table(self) -> dict[str, float]:
        """Every phase with its own seconds, plus the time no phase covers: the rows add up to `wall`."""
        rows = dict(self.seconds)
        rows[OTHER] = max(0.0, self.wall - sum(rows.values()))
        return rows

    def write(self, path: str | os.PathLike, **extra: Any) -> None:
        """The table as JSON, with start, end and wall seconds and `extra`."""
        with open(path, "w") as f:
            json.dump({"start": self.start, "end": self.end, "wall_s": self.wall, "phases": self.table(), **extra}, f,
                      indent=1)


def current() -> PhaseTimer | None:
    return _CURRENT.get()


@contextmanager
def phase(name: str) -> Iterator[None]:
    """Time the block as `name` in the current timer, if there is one."""
    timer = _CURRENT.get()
    with timer.phase(name) if timer is not None else nullcontext():
        yield


@contextmanager
def timing(timer: PhaseTimer | None = None) -> Iterator[PhaseTimer]:
    """The current timer (a run inside a timed command joins its table), else `timer` or a new one made current
    for the block and stopped at its end."""
    outer = _CURRENT.get()
    if outer is not None and timer is None:
        yield outer
        return
    timer = timer or PhaseTimer()
    token = _CURRENT.set(timer)
    try:
        yield timer
    finally:
        _CURRENT.reset(token)
        timer.stop()


class phased:
    """Enter a context manager under one phase name and leave it under another (a run's start and its end)."""

    def __init__(self, cm, enter: str, leave: str):
        self.cm, self.enter, self.leave = cm, enter, leave

    def __enter__(self):
        with phase(self.enter):
            return self.cm.__enter__()

    def __exit__(self, *exc) -> bool | None:
        with phase(self.leave):
            return self.cm.__exit__(*exc)


def process_start_time(pid: int | None = None) -> float | None:
    """When a process started, in unix seconds (10 ms resolution), from /proc; None where there is no /proc."""
    try:
        ticks = int(open(f"/proc/{pid or os.getpid()}/stat").read().rsplit(")", 1)[1].split()[19])
        since_boot = time.clock_gettime(time.CLOCK_BOOTTIME)
    except (OSError, IndexError, ValueError, AttributeError):
        return None
    return time.time() - (since_boot - ticks / os.sysconf("SC_CLK_TCK"))
