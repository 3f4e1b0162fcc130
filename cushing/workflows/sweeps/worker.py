"""The sweep worker: claim a configuration, train it as a trial (beating), record its value; while others train
the last ones, wait, so that a configuration whose worker dies is retried. Cohorts are decoded once per worker
process. A stop (Ctrl-C, SIGTERM, preemption) fails the trial as interrupted, not as a death."""
from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from concurrent.futures import Future
from typing import Any

from cushing.config import COHORT_FIELDS, TrainConfig
from cushing.model.backbones import interpolation_of
from cushing.model.train import prepare_cohort
from cushing.workflows.experiment import run_single
from cushing.workflows.finisher import Finisher, FinishStopped, finishing_beside
from cushing.workflows.studies import Study
from cushing.workflows.sweeps.grid import _Grid, _attempts, _new_trial, _open_grid, _previous_trial, _taken_over
from cushing.workflows.sweeps.storage import _beat, _optuna
from cushing.workflows.sweeps.watch import _adopt_beatless, _end_orphan, _fail_stale, _heartbeat

__all__ = ["sweep_worker"]


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


def _train_claimed(grid: _Grid, label: str, attempt: int, memo: _CohortMemo, progress: bool,
                   finisher: Finisher | None = None) -> float | None:
    """Train a claimed configuration as a trial; its objective value, or None when another worker had taken the
    configuration over while this one started (the trial is failed as `superseded`, not counted as a death).
    With a finisher, the run is finished beside the next training; the trial keeps beating and is told its
    value (or failed) once its run has ended."""
    study = grid.study
    i = study.labels.index(label)
    retry_of = _previous_trial(grid, label, attempt) if attempt else None
    trial = _new_trial(grid, label, attempt, retry_of)
    cfg = dataclasses.replace(study.configurations[i], experiment=study.experiment, run_name=label)
    tags = {"sweep": study.name, "sweep_config": label, "optuna_trial": str(trial.number),
            **({"retry_of_trial": str(retry_of)} if retry_of is not None else {})}
    beating = contextlib.ExitStack()
    beating.enter_context(_heartbeat(grid.storage, trial._trial_id))
    try:
        why = _taken_over(grid, label, attempt, trial._trial_id)
        if why:
            _fail_trial(grid, trial, "superseded", why)
            beating.close()
            return None
        summary = run_single(cfg, cohort=memo.get(cfg), parent_run_id=grid.parent, progress=progress,
                             extra_tags=tags, on_start=lambda run_id: trial.set_user_attr("mlflow_run_id", run_id),
                             finisher=finisher)
    except BaseException as e:
        # stopped (SIGTERM, Ctrl-C, preempted): claimed again by the next worker and not counted against
        # MAX_RETRY; an exit from inside training is retried as a death; a training error would only repeat
        _fail_trial(grid, trial, _why_key(e), f"{type(e).__name__}: {e}"[:2000])
        beating.close()
        raise
    value = _objective_value(summary.metrics, study)
    if summary.pending is None:
        grid.ostudy.tell(trial, value)
        beating.close()
    else:
        summary.pending.add_done_callback(lambda done: _settle_trial(grid, trial, label, value, done, beating))
    return value


def _why_key(e: BaseException) -> str:
    return "interrupted" if isinstance(e, (KeyboardInterrupt, FinishStopped)) else "exited" \
        if isinstance(e, SystemExit) else "error"


def _settle_trial(grid: _Grid, trial, label: str, value: float, done: Future, beating: contextlib.ExitStack) -> None:
    """On the finisher's thread, once the trial's run has ended: tell its value, or fail it (an error while
    finishing counts as a training error; a stop before the run was finished, as interrupted)."""
    try:
        e = done.exception()
        if e is None:
            grid.ostudy.tell(trial, value)
        else:
            _fail_trial(grid, trial, _why_key(e), f"{type(e).__name__}: {e}"[:2000])
    finally:
        beating.close()
    n = len(grid.study.labels)
    try:
        done_n = sum(a.done for a in _attempts(grid).values())
    except Exception:  # the count is for the progress line only
        return
    _say(grid, f"configuration {grid.study.labels.index(label) + 1}/{n} {label}: run "
               f"{'finished' if e is None else 'ended (' + type(e).__name__ + ')'}; {done_n}/{n} done")


def _fail_trial(grid: _Grid, trial, key: str, why: str) -> None:
    """Fail a trial with the reason under user attribute `key` (unless it was failed already, e.g. as stale)."""
    optuna = _optuna()
    from optuna.trial import TrialState

    try:
        trial.set_user_attr(key, why)
    except optuna.exceptions.UpdateFinishedTrialError:
        return
    grid.ostudy.tell(trial, state=TrialState.FAIL, skip_if_finished=True)


def _say(grid: _Grid, text: str) -> None:
    print(f"[sweep {grid.study.name}] {text}", flush=True)


def sweep_worker(study: Study, storage: str, parent_run_id: str | None = None, progress: bool = False,
                 grid: _Grid | None = None) -> int:
    """Claim and train configurations until every one is done or failed for good; returns how many this worker
    trained. While others train the last ones, it waits, so that a configuration whose worker dies is retried.
    Each run is finished (model, plots, Grad-CAM, upload) beside the next one's training."""
    if grid is None:
        grid = _open_grid(study, storage, parent_run_id)
        try:
            return _work_finishing(grid, progress)
        finally:
            grid.close()
    return _work_finishing(grid, progress)


def _work_finishing(grid: _Grid, progress: bool) -> int:
    with finishing_beside(lambda text: _say(grid, text)) as finisher:
        return _work(grid, progress, finisher)


def _work(grid: _Grid, progress: bool, finisher: Finisher | None) -> int:
    study = grid.study
    memo, trained, n = _CohortMemo(), 0, len(study.labels)
    interval, _ = _beat()
    while True:
        if finisher is not None:
            finisher.check()  # a run whose finishing failed stops this worker, loudly
        _adopt_beatless(grid)
        for t in _fail_stale(grid.ostudy):
            _end_orphan(t)
        states = _attempts(grid)
        todo = [(label, a.next_attempt) for label, a in states.items() if a.next_attempt is not None]
        if not todo and not any(a.live for a in states.values()):
            return trained
        won = next(((label, k) for label, k in todo if grid.claims.claim(grid.name, label, k)), None)
        if won is None:
            time.sleep(min(interval, 2.0))  # the rest are training elsewhere: wait, in case a worker dies
            continue
        label, attempt = won
        done = sum(a.done for a in states.values())
        _say(grid, f"configuration {study.labels.index(label) + 1}/{n} {label}: training"
                   f"{f' (attempt {attempt + 1})' if attempt else ''}; {done}/{n} done")
        value = _train_claimed(grid, label, attempt, memo, progress, finisher)
        if value is None:
            _say(grid, f"configuration {study.labels.index(label) + 1}/{n} {label}: another worker took it over "
                       "while this one started; not training it here")
            continue
        trained += 1
        head = f"configuration {study.labels.index(label) + 1}/{n} {label}: {study.objective_metric} {value:.4f}"
        if finisher is not None:
            _say(grid, f"{head}; its run is finished beside the next training")
        else:
            _say(grid, f"{head}; {sum(a.done for a in _attempts(grid).values())}/{n} done")
