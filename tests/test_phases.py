"""The run's own phase timer: nested phases counted once, rows that add up to the timed span, a timer per thread."""
from __future__ import annotations

import json
import threading
import time

import pytest

from cushing.phases import OTHER, PhaseTimer, current, phase, phased, process_start_time, timing


def test_nested_phases_count_once_and_the_rows_add_up_to_the_span():
    with timing() as timer:
        with phase("outer"):
            time.sleep(0.05)
            with phase("inner"):
                time.sleep(0.05)
        with phase("inner"):  # a name seen again accumulates
            time.sleep(0.02)
        time.sleep(0.03)  # in no phase
    rows = timer.table()
    assert list(rows) == ["inner", "outer", OTHER]  # in the order each phase ended first; the rest last
    assert rows["outer"] == pytest.approx(0.05, abs=0.04) and rows["inner"] == pytest.approx(0.07, abs=0.04)
    assert rows[OTHER] == pytest.approx(0.03, abs=0.04)
    assert sum(rows.values()) == pytest.approx(timer.wall, rel=1e-9)
    assert timer.end == pytest.approx(timer.start + timer.wall)
    assert current() is None, "the timer is current only inside its block"


def test_phase_is_a_no_op_without_a_timer_and_an_inner_block_joins_the_outer_timer():
    with phase("nothing records this"):
        pass
    with timing() as outer:
        with timing() as inner:
            with phase("work"):
                pass
        assert inner is outer, "a run inside a timed command adds to its table"
    assert "work" in outer.seconds


def test_a_thread_has_its_own_timer():
    seen = {}

    def other():
        seen["timer"] = current()
        with timing() as t:
            with phase("elsewhere"):
                pass
        seen["own"] = t
    with timing() as main:
        th = threading.Thread(target=other)
        th.start()
        th.join()
    assert seen["timer"] is None and "elsewhere" in seen["own"].seconds and "elsewhere" not in main.seconds


def test_phased_times_entering_and_leaving_apart_and_keeps_exceptions():
    class Slow:
        def __enter__(self):
            time.sleep(0.03)
            return "value"

        def __exit__(self, *exc):
            time.sleep(0.03)
            return False
    with timing() as timer:
        with pytest.raises(KeyError):
            with phased(Slow(), "open", "close") as v:
                assert v == "value"
                raise KeyError("x")
    assert timer.seconds["open"] >= 0.025 and timer.seconds["close"] >= 0.025


def test_written_table_and_process_start(tmp_path):
    timer = PhaseTimer()
    with timing(timer):
        with phase("a"):
            pass
    timer.write(tmp_path / "p.json", run_id="r1")
    data = json.loads((tmp_path / "p.json").read_text())
    assert data["run_id"] == "r1" and set(data["phases"]) == {"a", OTHER}
    assert sum(data["phases"].values()) == pytest.approx(data["wall_s"])
    started = process_start_time()
    assert started is not None and started <= timer.start <= time.time()
    assert time.time() - started < 24 * 3600, "this test process started recently"


def test_python_m_cushing_exits_with_a_thread_pool_alive(tmp_path):
    """The fast exit (no module-by-module teardown) still runs threading's exit hooks first: a ThreadPoolExecutor
    left open (MLflow makes some) stops its workers there; joining them without it waited for ever."""
    import subprocess
    import sys

    from tests.conftest import ROOT

    code = ("import concurrent.futures, runpy, sys\n"
            "pool = concurrent.futures.ThreadPoolExecutor(2)\n"
            "pool.submit(print, 'pool used').result()\n"
            f"sys.argv = ['cushing', 'sweep', {str(ROOT / 'projects' / 'paper.yaml')!r}, '--plan']\n"
            "runpy.run_module('cushing', run_name='__main__')\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert r.returncode == 0 and "pool used" in r.stdout and "--workers 4:" in r.stdout, r.stderr[-2000:]
