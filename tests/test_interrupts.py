"""A stop that lands inside a store write is raised when the write returns (cushing.interrupts), with the real
signal handler of `cushing` commands and a real embedded SQLite store."""
from __future__ import annotations

import os
import signal
import threading

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
