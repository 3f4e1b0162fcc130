"""The chaos soak (scripts/soak.py) as a standing check: a sweep of six tiny configurations on two workers, stopped
at random moments (SIGTERM to its process group, SIGKILL to its group, SIGKILL to one worker), relaunched after
each stop and run to the end; every configuration FINISHED exactly once, nothing left RUNNING in MLflow or Optuna,
and one more launch trains nothing. The seed is printed (`bash scripts/soak.sh --seed N` replays it). On the
PostgreSQL stack the same, with the tracking server restarted while the sweep runs to the end."""
from __future__ import annotations

import importlib.util
import os
import random
import threading
import time

import pytest

from tests.conftest import ROOT, fresh_database

pytestmark = [pytest.mark.slow, pytest.mark.faults]


def _soak_module():
    spec = importlib.util.spec_from_file_location("cushing_soak", ROOT / "scripts" / "soak.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _seed() -> int:
    return int(os.environ.get("CUSHING_SOAK_SEED") or random.SystemRandom().randrange(2**31))


def test_a_sweep_stopped_at_random_moments_trains_each_configuration_once(tmp_path, cushing_home, demo_manifest):
    seed = _seed()
    print(f"soak seed {seed} (CUSHING_SOAK_SEED={seed} replays it)")
    report = _soak_module().soak(tmp_path / "soak", seed=seed, rounds=3)
    assert report["problems"] == [], f"seed {seed}: {report['problems']} (log: {report['log']})"


@pytest.mark.postgres
def test_the_soak_on_postgres_with_the_tracking_server_restarted(tmp_path, pg_stack, cushing_home, demo_manifest,
                                                                  monkeypatch):
    for k, v in {**pg_stack.env(), "CUSHING_OPTUNA_STORAGE": fresh_database(pg_stack, "optuna_soak")}.items():
        monkeypatch.setenv(k, v)

    def restart_the_server(final):  # once the final launch is under way, the server goes away and comes back
        def restart() -> None:
            time.sleep(12)
            pg_stack.server.stop()
            time.sleep(2)
            pg_stack.server.start()
        thread = threading.Thread(target=restart, daemon=True)
        thread.start()
        return thread.join
    seed = _seed()
    print(f"soak seed {seed} (CUSHING_SOAK_SEED={seed} replays it)")
    report = _soak_module().soak(tmp_path / "soak", seed=seed, rounds=3, name="soakpg", during=restart_the_server)
    assert report["problems"] == [], f"seed {seed}: {report['problems']} (log: {report['log']})"
