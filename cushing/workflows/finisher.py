"""Finishing runs beside the next training: a sweep worker (grid or tuning) hands each scored run to one
background thread that logs its model, tables, plots and Grad-CAM, uploads them and ends the run, while the
worker's main thread trains the next configuration.

Bounded: one run waits at most while one is being finished (a third hand-over blocks), and a waiting run holds
its best-epoch weights only (scoring, which stays on the trainer, released the device copy of the images).
Loud: a run whose finishing fails ends FAILED with the error in its tag `cushing.finish_error`, and the error is
raised in the worker's thread (`check`, `join`) as `FinishError`, naming the run. A stop (Ctrl-C, SIGTERM) drains
within a grace (CUSHING_FINISH_GRACE_S, 20 s: inside Slurm's 30 s KillWait) and ends what it could not finish
KILLED with tag `cushing.stopped: finishing`: every run started ends in a final state.
"""
from __future__ import annotations

import os
import threading
import time
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator

from cushing.phases import PhaseTimer, phase, timing
from cushing.workflows.finishing import RunSummary, Scored, _summary, finish_rest

__all__ = ["Finisher", "FinishError", "FinishStopped", "FINISH_GRACE_ENV", "summary_now", "finishing_beside"]

FINISH_GRACE_ENV = "CUSHING_FINISH_GRACE_S"
RUN_END = "run end"


class FinishError(RuntimeError):
    """Finishing a run (model logging, tables, plots, Grad-CAM, upload) failed; the run ended FAILED."""

    def __init__(self, run_id: str, label: str, cause: BaseException):
        super().__init__(f"finishing run {run_id} ({label}) failed after its training: "
                         f"{type(cause).__name__}: {cause}; the run is FAILED (tag cushing.finish_error)")
        self.run_id = run_id


class FinishStopped(Exception):
    """A stop came before the run could be finished; the run ended KILLED."""


@dataclass
class _Job:
    scored: Scored
    timer: PhaseTimer = field(default_factory=PhaseTimer)
    future: Future = field(default_factory=Future)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _settled: bool = False

    @property
    def run(self):
        return self.scored.trained.run

    @property
    def label(self) -> str:
        return self.scored.trained.cfg.run_name or self.run.run_id

    def settle(self) -> bool:
        """Claim the right to end the run (once: the finisher, or a stop that gives up waiting for it)."""
        with self._lock:
            if self._settled:
                return False
            self._settled = True
            return True

    def finish(self) -> None:
        """On the finisher thread: finish and end the run FINISHED, or FAILED (loudly) when a step fails."""
        with timing(self.timer):
            try:
                summary = finish_rest(self.scored)
            except BaseException as e:
                self._fail(e)
                raise FinishError(self.run.run_id, self.label, e) from e
            if not self.settle():  # a stop gave up on it meanwhile: it is KILLED already
                return
            with phase(RUN_END):
                self.run.end("FINISHED")
        summary.phases = self.timer
        self.future.set_result(summary)

    def _fail(self, e: BaseException) -> None:
        if not self.settle():
            return
        try:
            self.run.set_tags({"cushing.finish_error": f"{type(e).__name__}: {e}"[:5000]})
        except Exception:  # the store itself may be what failed: the status below still says it
            pass
        try:
            self.run.end("FAILED")
        finally:
            self.future.set_exception(e)

    def kill(self) -> None:
        """End the run KILLED (a stop came before it was finished), unless it was ended already."""
        if not self.settle():
            return
        try:
            self.run.set_tags({"cushing.stopped": "finishing"})
        except Exception:
            pass
        try:
            self.run.end("KILLED")
        finally:
            self.future.set_exception(FinishStopped(f"run {self.run.run_id} stopped before it was finished"))


class Finisher:
    """One background thread finishing the runs a worker hands over, one waiting at most."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._waiting: _Job | None = None
        self._current: _Job | None = None
        self._closing = False
        self._error: FinishError | None = None
        self._thread: threading.Thread | None = None

    def submit(self, scored: Scored) -> Future:
        """Hand a scored run over (its `RunLogger` must be handed over too); blocks while one run waits already.
        The future gives the run's full `RunSummary` (its `phases`: the finishing's own, timed on the finisher's
        thread), or raises what failed (or `FinishStopped`)."""
        job = _Job(scored)
        with self._cond:
            while self._waiting is not None:
                self._cond.wait(0.5)
            self._waiting = job
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="cushing-finisher", daemon=True)
                self._thread.start()
            self._cond.notify_all()
        return job.future

    def check(self) -> None:
        """Raise the first finishing failure, if there was one (in the worker's thread, before it goes on)."""
        with self._cond:
            if self._error is not None:
                err, self._error = self._error, None
                raise err

    def join(self) -> None:
        """Finish every run handed over, then raise the first failure, if any."""
        self._close()
        if self._thread is not None:
            self._thread.join()
        self.check()

    def stop(self, grace: float | None = None) -> None:
        """A stop: finish what can be finished within `grace` seconds, end the rest KILLED (a second Ctrl-C
        ends them at once). Never raises the runs' own failures (they are FAILED and tagged already)."""
        grace = float(os.environ.get(FINISH_GRACE_ENV, "20")) if grace is None else grace
        self._close()
        deadline = time.monotonic() + grace
        try:
            while self._thread is not None and self._thread.is_alive() and time.monotonic() < deadline:
                self._thread.join(min(0.5, max(0.0, deadline - time.monotonic())))
        except KeyboardInterrupt:
            pass
        with self._cond:
            left = [j for j in (self._current, self._waiting) if j is not None]
            self._waiting = None
        for job in left:
            job.kill()

    def _close(self) -> None:
        with self._cond:
            self._closing = True
            self._cond.notify_all()

    def _loop(self) -> None:
        while True:
            with self._cond:
                while self._waiting is None and not self._closing:
                    self._cond.wait()
                if self._waiting is None:
                    return
                job, self._waiting, self._current = self._waiting, None, self._waiting
                self._cond.notify_all()
            try:
                job.finish()
            except FinishError as e:
                with self._cond:
                    self._error = self._error or e
            except BaseException as e:  # noqa: BLE001 - a failure outside finish_rest (ending the run)
                with self._cond:
                    self._error = self._error or FinishError(job.run.run_id, job.label, e)
            finally:
                with self._cond:
                    self._current = None
                    self._cond.notify_all()


@contextmanager
def finishing_beside(say: Callable[[str], None]) -> Iterator[Finisher | None]:
    """A worker's finisher for the block (None when CUSHING_FINISHER=0: each run is finished before the next
    trains). At the end it is joined (its first failure raised, naming the run); on a stop it drains within its
    grace and ends what is left KILLED; after another error it finishes what it holds, `say`ing a failure there."""
    if os.environ.get("CUSHING_FINISHER", "1") == "0":
        yield None
        return
    finisher = Finisher()
    try:
        yield finisher
    except (KeyboardInterrupt, SystemExit):
        finisher.stop()
        raise
    except BaseException:
        try:
            finisher.join()
        except FinishError as e:
            say(str(e))
        raise
    finisher.join()


def summary_now(scored: Scored, pending: Future) -> RunSummary:
    """What the worker's thread knows of a handed-over run: its final results so far (all but Grad-CAM's), the
    predictions and selection; `pending` gives the full summary once the run is finished."""
    summary = _summary(scored, dict(scored.metrics), None)
    summary.pending = pending
    return summary
