"""Heartbeats and deaths: a trial beats while its configuration trains; a worker that dies stops beating, its
trial is failed after the grace period (and its MLflow run marked FAILED), so a live worker claims the
configuration again; a trial left RUNNING with no heartbeat at all is given one, so that it goes stale too."""
from __future__ import annotations

import datetime as dt
import threading
from contextlib import contextmanager
from typing import Iterator

from cushing import tracking
from cushing.workflows.sweeps.grid import _Grid
from cushing.workflows.sweeps.storage import _beat

__all__: list[str] = []  # package-internal: the worker and tuning use these


@contextmanager
def _heartbeat(storage, trial_id: int) -> Iterator[None]:
    """Beat for a trial while its configuration trains, as Optuna's own optimize loop does."""
    interval, _ = _beat()
    stop = threading.Event()

    def beat() -> None:
        while True:
            try:
                storage.record_heartbeat(trial_id)
            except Exception:  # a brief database outage: the next beat tries again
                pass
            if stop.wait(interval):
                return
    thread = threading.Thread(target=beat, name=f"heartbeat-{trial_id}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def _adopt_beatless(grid: _Grid) -> list[int]:
    """Give a heartbeat to every RUNNING trial of the grid that has none although it started more than the grace
    period ago (its worker died between creating the trial and its first beat). Optuna's stale check skips
    trials without a heartbeat, so such a trial would count as training forever; with one, it goes stale one
    grace period later unless its worker, alive after all, beats it (a heartbeat rather than failing it at once:
    nothing is lost if that worker is only slow). Returns the trial ids adopted."""
    import sqlalchemy as sa
    from optuna.storages._rdb.models import TrialHeartbeatModel
    from optuna.trial import TrialState

    _, grace = _beat()
    old = dt.datetime.now() - dt.timedelta(seconds=grace)
    running = {t._trial_id for t in grid.ostudy.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
               if t.datetime_start is not None and t.datetime_start < old}
    if not running:
        return []
    hb = TrialHeartbeatModel.__table__
    with grid.storage.engine.connect() as conn:
        beaten = {r[0] for r in conn.execute(sa.select(hb.c.trial_id).where(hb.c.trial_id.in_(running)))}
    adopted = sorted(running - beaten)
    for trial_id in adopted:
        grid.storage.record_heartbeat(trial_id)  # a concurrent first beat of the same trial is ignored by Optuna
    return adopted


def _fail_stale(ostudy) -> list:
    """Fail trials whose worker stopped beating (sweeps claim their retries; tuning re-queues them)."""
    from optuna.storages import fail_stale_trials
    from optuna.trial import TrialState

    import warnings

    before = {t.number for t in ostudy.get_trials(deepcopy=False) if t.state == TrialState.FAIL}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the heartbeat API is marked experimental
        fail_stale_trials(ostudy)
    return [t for t in ostudy.get_trials(deepcopy=False) if t.state == TrialState.FAIL and t.number not in before]


def _end_orphan(frozen_trial) -> None:
    """The MLflow child run of a trial whose worker died is marked FAILED, with the retry noted."""
    run_id = frozen_trial.user_attrs.get("mlflow_run_id")
    if not run_id:
        return
    try:
        if tracking.get_run(run_id).status == "RUNNING":
            tracking.end_run_as(run_id, "FAILED", {"worker_died": "heartbeat stale; the configuration was retried"})
    except Exception:  # the run may be gone; nothing to mark
        pass
