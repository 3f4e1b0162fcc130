"""A stop that lands inside a store write is raised when the write returns (cushing.interrupts), with the real
signal handler of `cushing` commands and a real embedded SQLite store."""
from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from cushing import interrupts
from cushing.cli import stops


@pytest.fixture
def handler():
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    for s in saved:
        signal.signal(s, stops._on_signal)
    yield
    for s, h in saved.items():
        signal.signal(s, h)


def test_a_sigterm_inside_a_held_block_is_raised_when_it_ends(handler):
    reached = []
    with pytest.raises(stops.Terminated):
        with interrupts.held():
            os.kill(os.getpid(), signal.SIGTERM)
            reached.append("after the signal")  # the write goes on to its end
    assert reached == ["after the signal"]


def test_outside_a_held_block_or_when_inactive_the_stop_is_raised_at_once(handler):
    reached = []
    with pytest.raises(KeyboardInterrupt):
        with interrupts.held(active=False):
            os.kill(os.getpid(), signal.SIGINT)
            reached.append("not reached")
    assert reached == []


def test_the_sqlite_client_holds_a_stop_until_its_write_returns(handler, tmp_path, monkeypatch):
    """The client of an embedded store: a SIGTERM raised while create_run writes leaves the run created and the
    store writable (no lock left behind) by another thread."""
    from cushing import tracking

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    c = tracking.client()
    exp = c.create_experiment("held")
    inner = c._inner.create_run

    def create_run(*a, **k):
        os.kill(os.getpid(), signal.SIGTERM)  # lands mid-call
        return inner(*a, **k)
    c._inner.create_run = create_run
    with pytest.raises(stops.Terminated):
        c.create_run(exp)
    runs = c.search_runs([exp])
    assert len(runs) == 1, "the write the stop landed in completed"
    done = []
    t = threading.Thread(target=lambda: done.append(c.set_terminated(runs[0].info.run_id, "KILLED")))
    t.start()
    t.join(30)
    assert done and c.get_run(runs[0].info.run_id).info.status == "KILLED"


def test_a_stop_landing_inside_logging_leaves_its_lock_free_for_other_threads(handler):
    """The defect a pipeline test met: a SIGTERM inside `Logger.setLevel` (which takes logging's module lock
    without a try/finally) left the lock held for good, so the finisher thread blocked at its next log line and
    the command hung. The stop now waits until logging has let go, and is raised right after."""
    import logging

    logger = logging.getLogger("cushing.test.landing")
    reached = []

    class Landing(dict):
        def clear(self):  # called under logging's module lock by setLevel
            os.kill(os.getpid(), signal.SIGTERM)
            reached.append("inside logging")  # the handler ran (Python code) and did not raise here
            super().clear()

    logger._cache = Landing()
    try:
        with pytest.raises(stops.Terminated):
            logger.setLevel(logging.INFO)
            reached.append("setLevel returned")
            for _ in range(500):  # raised within a few rechecks (RECHECK_S)
                time.sleep(0.01)
            reached.append("not reached")
    finally:
        logger._cache = {}  # any later setLevel anywhere clears every logger's cache
    assert reached == ["inside logging", "setLevel returned"]
    logged = threading.Thread(target=lambda: logging.getLogger("cushing.test.other").isEnabledFor(5))
    logged.start()
    logged.join(10)
    assert not logged.is_alive(), "another thread can use logging (its lock was released)"


def test_a_stop_waits_while_the_main_thread_has_a_database_connection(handler, tmp_path):
    """A SIGTERM while the main thread is inside a transaction (Optuna's and MLflow's stores, through SQLAlchemy)
    is raised once the connection is given back: the transaction committed and the file is not left locked."""
    import sqlalchemy as sa

    interrupts.guard_connections()
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'x.db'}")
    with engine.begin() as c:
        c.execute(sa.text("create table t (x int)"))
    reached = []
    with pytest.raises(stops.Terminated):
        with engine.begin() as c:
            c.execute(sa.text("insert into t values (1)"))
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.2)
            c.execute(sa.text("insert into t values (2)"))
            reached.append("transaction done")
        for _ in range(500):
            time.sleep(0.01)
        reached.append("not reached")
    assert reached == ["transaction done"]
    other = sa.create_engine(f"sqlite:///{tmp_path / 'x.db'}", connect_args={"timeout": 2})
    done = []

    def write() -> None:
        with other.begin() as c:
            c.execute(sa.text("insert into t values (3)"))
        done.append(True)
    t = threading.Thread(target=write)
    t.start()
    t.join(20)
    assert done, "another connection could write: no lock left behind"
    with other.connect() as c:
        assert sorted(x for (x,) in c.execute(sa.text("select x from t"))) == [1, 2, 3]


def test_a_stop_is_held_back_no_longer_than_its_bound(handler, monkeypatch):
    """A main thread that stays busy (a wedged call holding logging's lock) still stops, after MAX_HOLD_S."""
    import logging

    monkeypatch.setattr(interrupts, "MAX_HOLD_S", 0.3)
    started = time.monotonic()
    with pytest.raises(stops.Terminated):
        logging._lock.acquire()
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            while time.monotonic() - started < 10:
                time.sleep(0.01)
        finally:
            logging._lock.release()
    assert time.monotonic() - started < 10, "raised while the lock was still held, at the bound"


def test_the_timer_of_whoever_used_sigalrm_before_is_given_back(handler):
    """pytest-timeout (and others) keep a SIGALRM timer: a held-back stop borrows it and puts it back."""
    import logging

    fired = []
    previous = signal.signal(signal.SIGALRM, lambda s, f: fired.append(s))
    try:
        signal.setitimer(signal.ITIMER_REAL, 1.0)
        with pytest.raises(stops.Terminated):
            with logging._lock:
                os.kill(os.getpid(), signal.SIGTERM)
            for _ in range(100):
                time.sleep(0.01)
        assert signal.getsignal(signal.SIGALRM) is not interrupts._recheck
        assert 0 < signal.getitimer(signal.ITIMER_REAL)[0] <= 1.0
        for _ in range(300):
            if fired:
                break
            time.sleep(0.01)
        assert fired == [signal.SIGALRM], "the earlier timer still fires, once"
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
