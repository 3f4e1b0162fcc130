"""The sweep worker: `ask()` a queued configuration, train it as a beating trial, `tell()` its value (on this
thread, retried on a transient store error), repeat; while others train the last ones, wait, so that a dead
worker's configuration (stale, re-queued by Optuna) is retried. A configuration whose run already FINISHED is told
its value, never trained again. A stop fails the trial as `interrupted`; a live worker or the next launch queues it
again."""
from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import math
import os
import socket
import threading
import time
import warnings
from contextlib import contextmanager
from typing import Any, Iterator

from cushing import stops, tracking
from cushing.config import COHORT_FIELDS, TrainConfig
from cushing.model.backbones import interpolation_of
from cushing.model.train import prepare_cohort
from cushing.workflows.experiment import run_single
from cushing.workflows.studies import Study
from cushing.workflows.sweeps.storage import _Grid, _beat, _open_grid, _standings

__all__ = ["sweep_worker", "worker_id"]


def worker_id() -> str:
    """host:pid, as a trial's `worker` attribute names the worker that took it."""
    return f"{socket.gethostname()}:{os.getpid()}"


class _CohortMemo:
    """Decode each cohort once per worker process (configurations often share data and image size): one cohort
    per distinct value of COHORT_FIELDS and the backbone's interpolation."""

    def __init__(self):
        self.memo: dict[tuple, Any] = {}

    @staticmethod
    def key(cfg: TrainConfig) -> tuple:
        return (*(getattr(cfg, f) for f in COHORT_FIELDS), interpolation_of(cfg.model))

    def get(self, cfg: TrainConfig):
        key = self.key(cfg)
        if key not in self.memo:
            self.memo[key] = prepare_cohort(cfg, progress=False)
        return self.memo[key]


def _objective_value(metrics: dict[str, float], study: Study) -> float:
    """The trial's value: the objective metric, or the worst value when it is missing or not estimable."""
    value = metrics.get(study.objective_metric, math.nan)
    return value if math.isfinite(value) else (-1.0 if study.direction == "maximize" else 1e9)


def _say(grid: _Grid, text: str) -> None:
    print(f"[sweep {grid.study.name}] {text}", flush=True)


def _trial_id(grid: _Grid, number: int) -> int:
    study_id = grid.storage.get_study_id_from_name(grid.name)
    return grid.storage.get_trial_id_from_study_id_trial_number(study_id, number)


@contextmanager
def _beating(grid: _Grid, trial_id: int) -> Iterator[None]:
    """Beat for a trial while its configuration trains (the first beat before the block starts), as Optuna's own
    optimize loop does; a worker that dies stops beating and its trial goes stale."""
    done = threading.Event()
    grid.storage.record_heartbeat(trial_id)

    def beat() -> None:
        while not done.wait(_beat()[0]):
            try:
                grid.storage.record_heartbeat(trial_id)
            except Exception:  # a brief database outage: the next beat tries again
                pass
    thread = threading.Thread(target=beat, name=f"trial-heartbeat-{trial_id}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


def _retrying(fn, *args, **kwargs):
    """A store call retried on a transient error (SQLite busy, a dropped connection, a server restarting)."""
    import sqlalchemy as sa

    for wait in (0.5, 1, 2, 4, 8, 16, 0):
        try:
            return fn(*args, **kwargs)
        except sa.exc.DBAPIError:
            if not wait:
                raise
            time.sleep(wait)


def _tend(grid: _Grid) -> None:
    """Fail trials whose worker stopped beating (Optuna re-queues them) and, under the queue's lock, queue again
    the configurations a stop interrupted, and fail (and re-queue) a trial whose worker died before its first beat:
    Optuna's stale check skips a trial that never beat."""
    from optuna.storages import fail_stale_trials
    from optuna.trial import TrialState

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the heartbeat API is marked experimental
        fail_stale_trials(grid.ostudy)
    _, grace = _beat()
    with grid.lock():
        for label, s in _standings(grid).items():
            t = s.last
            if s.failed and t is not None and "interrupted" in t.user_attrs:
                grid.ostudy.enqueue_trial(t.params or grid.params[grid.study.labels.index(label)],
                                          user_attrs={"label": label, "retry_of": t.number})
            elif (s.training and t.state == TrialState.RUNNING and "worker" not in t.user_attrs
                  and t.datetime_start and dt.datetime.now() - t.datetime_start > dt.timedelta(seconds=10 * grace)):
                _fail_beatless(grid, t)


def _fail_beatless(grid: _Grid, trial) -> None:
    import optuna

    tid = _trial_id(grid, trial.number)
    with contextlib.suppress(optuna.exceptions.UpdateFinishedTrialError):
        retry = grid.storage.get_heartbeat_stale_trial_callback()
        if grid.storage.set_trial_state_values(tid, optuna.trial.TrialState.FAIL) and retry is not None:
            retry(grid.ostudy, grid.storage.get_trial(tid))


def _ask(grid: _Grid):
    """A queued configuration's trial, or None when the queue is empty (a trial Optuna made because another worker
    took the last one meanwhile is failed at once, as `queue_empty`)."""
    from optuna.trial import TrialState

    if not grid.ostudy.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "heartbeat is supposed to be used with Study.optimize": we beat ourselves
        trial = _retrying(grid.ostudy.ask)
    if "label" not in trial.user_attrs:
        trial.set_user_attr("queue_empty", "another worker took the last queued configuration")
        _retrying(grid.ostudy.tell, trial, state=TrialState.FAIL, skip_if_finished=True)
        return None
    return trial


def _fail(grid: _Grid, trial, key: str, why: str) -> None:
    """Fail a trial with the reason under user attribute `key` (unless it was failed already, e.g. as stale)."""
    import optuna

    with contextlib.suppress(optuna.exceptions.UpdateFinishedTrialError):
        trial.set_user_attr(key, why[:2000])
        grid.ostudy.tell(trial, state=optuna.trial.TrialState.FAIL, skip_if_finished=True)


def _finished_run(grid: _Grid, label: str) -> tracking.RunRecord | None:
    runs = tracking.find_runs(grid.study.experiment, parent_run_id=grid.parent,
                              filter_string=f"tags.sweep_config = '{label}' and attributes.status = 'FINISHED'")
    return runs[0] if runs else None


def _train(grid: _Grid, trial, memo: _CohortMemo, progress: bool) -> float:
    """Train the trial's configuration (or take its finished run's value)."""
    study, label = grid.study, trial.user_attrs["label"]
    i = study.labels.index(label)
    for name, d in grid.dists.items():
        trial.suggest_categorical(name, d.choices)  # the queued values: the trial's real parameters
    if (done := _finished_run(grid, label)) is not None:
        trial.set_user_attr("mlflow_run_id", done.run_id)
        trial.set_user_attr("recovered", "its run had finished; the value was not told before its worker stopped")
        return _objective_value(done.metrics, study)
    _say(grid, f"configuration {i + 1}/{len(study.labels)} {label}: training")
    cfg = dataclasses.replace(study.configurations[i], experiment=study.experiment, run_name=label)
    tags = {"sweep": study.name, "sweep_config": label, "optuna_trial": str(trial.number),
            **({"retry_of_trial": str(trial.user_attrs["retry_of"])} if "retry_of" in trial.user_attrs else {})}
    summary = run_single(cfg, cohort=memo.get(cfg), parent_run_id=grid.parent, progress=progress, extra_tags=tags,
                         on_start=lambda run_id: trial.set_user_attr("mlflow_run_id", run_id))
    return _objective_value(summary.metrics, study)


def _run_trial(grid: _Grid, trial, memo: _CohortMemo, progress: bool) -> bool:
    """Beat, train, tell; True when this worker trained the configuration."""
    import optuna

    with _beating(grid, _trial_id(grid, trial.number)):
        try:
            trial.set_user_attr("worker", worker_id())  # after its first beat: it is no longer beatless
        except optuna.exceptions.UpdateFinishedTrialError:
            return False  # failed as beatless meanwhile (a very slow store): its retry is queued
        try:
            value = _train(grid, trial, memo, progress)
        except BaseException as e:  # a stop is queued again; a training error would only repeat: not retried
            _fail(grid, trial, "interrupted" if isinstance(e, KeyboardInterrupt) else "error",
                  f"{type(e).__name__}: {e}")
            raise
        _retrying(grid.ostudy.tell, trial, value, skip_if_finished=True)
    label, n = trial.user_attrs["label"], len(grid.study.labels)
    done = sum(s.done for s in _standings(grid).values())
    _say(grid, f"configuration {grid.study.labels.index(label) + 1}/{n} {label}: {grid.study.objective_metric} "
               f"{value:.4f}; {done}/{n} done")
    return "recovered" not in trial.user_attrs


def sweep_worker(study: Study, storage: str, parent_run_id: str | None = None, progress: bool = False,
                 grid: _Grid | None = None) -> int:
    """Take and train configurations until none is queued or training; returns how many this worker trained."""
    own = grid is None
    grid = grid or _open_grid(study, storage, parent_run_id)
    try:
        with stops.cooperative():
            memo, trained, interval = _CohortMemo(), 0, _beat()[0]
            while True:
                stops.check()
                _tend(grid)
                if (trial := _ask(grid)) is not None:
                    trained += _run_trial(grid, trial, memo, progress)
                elif not any(s.training or s.waiting for s in _standings(grid).values()):
                    return trained
                else:
                    stops.wait(min(interval, 2.0))  # the rest train elsewhere: wait, in case a worker dies
    finally:
        if own:
            grid.close()
