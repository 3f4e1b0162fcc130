"""Tuning: TPE (or random) sampling with median or successive-halving pruning on the per-epoch validation
metric; every trial a child run of the study's parent; best parameters, importances and the trials table logged
on the parent at the end. Any number of workers and hosts may share the storage."""
from __future__ import annotations

import dataclasses
import itertools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from cushing import tracking
from cushing.model.engine import StopTraining
from cushing.data.checks import check_cohorts
from cushing.workflows.experiment import run_single
from cushing.tracking.stores import sqlalchemy_url, store_lock
from cushing.workflows.studies import Study
from cushing.workflows.sweeps.storage import _close_storage, _name_metric, _optuna, _parent_run, _storage, \
    _study_name, default_storage, load_for
from cushing.workflows.sweeps.worker import _CohortMemo, _objective_value

__all__ = ["TuneResult", "TuneHandle", "open_tune", "run_tune", "finish_tune"]


def _sampler(study: Study):
    optuna = _optuna()
    s = dict(study.sampler)
    if s.pop("type", "tpe") == "random":
        return optuna.samplers.RandomSampler(**s)
    return optuna.samplers.TPESampler(**{"seed": 0, **s})


def _pruner(study: Study):
    optuna = _optuna()
    p = dict(study.pruner)
    kind = p.pop("type", "median")
    if kind == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner(**p)
    if kind == "none":
        return optuna.pruners.NopPruner()
    return optuna.pruners.MedianPruner(**{"n_startup_trials": 2, "n_warmup_steps": 2, **p})


def _suggest(trial, study: Study) -> dict[str, Any]:
    out = {}
    for p in study.space:
        if p.type == "categorical":
            out[p.name] = trial.suggest_categorical(p.name, list(p.choices))
        elif p.type == "int":
            out[p.name] = trial.suggest_int(p.name, int(p.low), int(p.high), log=p.log, step=int(p.step or 1))
        else:
            out[p.name] = trial.suggest_float(p.name, p.low, p.high, log=p.log, step=p.step)
    return out


def _tune_objective(study: Study, parent: str, memo: _CohortMemo, progress: bool):
    """The objective: train a trial's configuration, pruned on the per-epoch validation metric."""
    optuna = _optuna()

    def objective(trial) -> float:
        cfg = study.config_for({**_suggest(trial, study), "run_name": f"{study.name}-trial{trial.number}"})
        cfg = dataclasses.replace(cfg, experiment=study.experiment)

        def report(epoch: int, metrics: dict[str, float]) -> None:
            v = metrics.get(study.objective_metric)
            if v is None or not math.isfinite(v):
                return
            trial.report(v, epoch)
            if trial.should_prune():
                raise StopTraining(f"pruned by {type(trial.study.pruner).__name__} at epoch {epoch}")
        summary = run_single(cfg, cohort=memo.get(cfg), parent_run_id=parent, progress=progress, on_epoch=report,
                             extra_tags={"tune": study.name, "optuna_trial": str(trial.number)},
                             on_start=lambda run_id: trial.set_user_attr("mlflow_run_id", run_id))
        if summary.stopped.startswith("pruned"):
            tracking.set_tags(summary.run_id, {"pruned": summary.stopped})
            raise optuna.TrialPruned(summary.stopped)
        return _objective_value(summary.metrics, study)
    return objective


@dataclass
class TuneResult:
    parent_run_id: str
    study_name: str
    best_params: dict[str, Any]
    best_value: float
    importances: pd.DataFrame
    n_complete: int
    n_pruned: int


@dataclass
class TuneHandle:
    """An open tuning study (and its parent run) that launchers feed with trials."""

    study: Study
    ostudy: Any
    parent_run_id: str
    launcher_run: str | None
    storage: Any = None  # the Optuna RDB storage (closed by run_tune when done)


def open_tune(path: str | Path, *, storage: str | None = None, parent_run_id: str | None = None,
              compile: str | None = None) -> TuneHandle:
    """Load the study file, check its cohort, open (or create) its Optuna study and parent run."""
    optuna = _optuna()
    study = load_for(path, "tune", compile)
    check_cohorts([study.config_for({})])
    storage = storage or default_storage()
    launcher_run = tracking.launcher_run()
    rdb = _storage(storage, retry_stale=True)
    try:
        ostudy = optuna.create_study(study_name=_study_name(study), storage=rdb, sampler=_sampler(study),
                                     pruner=_pruner(study), direction=study.direction, load_if_exists=True)
        _name_metric(ostudy, study)
        with store_lock(sqlalchemy_url(storage), "sweep-queue"):
            parent = _parent_run(ostudy, study, parent_run_id)
    except BaseException:
        _close_storage(rdb)
        raise
    return TuneHandle(study, ostudy, parent, launcher_run, rdb)


def run_tune(path: str | Path, *, storage: str | None = None, n_trials: int | None = None, progress: bool = True,
             parent_run_id: str | None = None, compile: str | None = None) -> TuneResult:
    """This worker's `n_trials` of the study (any number of workers and hosts may share the storage)."""
    h = open_tune(path, storage=storage, parent_run_id=parent_run_id, compile=compile)
    try:
        n = n_trials or h.study.n_trials
        objective = _tune_objective(h.study, h.parent_run_id, _CohortMemo(), progress)
        h.ostudy.optimize(objective, n_trials=n, catch=(), callbacks=[_tune_progress(h.study.name, n)])
        result = finish_tune(h)
    finally:
        _close_storage(h.storage)
    if h.launcher_run and h.launcher_run != h.parent_run_id:
        with tracking.resume_run(h.launcher_run) as r:
            r.nest_under(h.parent_run_id)
            r.set_tags({"mlflow.runName": f"tune-{h.study.name}-pass", "task": "tune-pass",
                        "study": h.ostudy.study_name})
            r.log_metrics({"tune/trials_here": float(n), "tune/complete": float(result.n_complete)})
    return result


def _tune_progress(name: str, n: int):
    count = itertools.count(1)

    def callback(ostudy, trial) -> None:
        value = "pruned" if trial.value is None else f"{trial.value:.4f}"
        print(f"[tune {name}] trial {next(count)}/{n} (study trial {trial.number}): {value}", flush=True)
    return callback


def finish_tune(h: TuneHandle) -> TuneResult:
    """Best parameters, importances and the trials table on the parent run."""
    optuna = _optuna()
    ostudy, study, parent = h.ostudy, h.study, h.parent_run_id
    complete = [t for t in ostudy.trials if t.state == optuna.trial.TrialState.COMPLETE]
    pruned = [t for t in ostudy.trials if t.state == optuna.trial.TrialState.PRUNED]
    imp = pd.DataFrame(columns=["parameter", "importance"])
    if len(complete) >= 2:
        try:
            values = optuna.importance.get_param_importances(ostudy)
            imp = pd.DataFrame({"parameter": list(values), "importance": list(values.values())})
        except (RuntimeError, ValueError) as e:  # e.g. a parameter that never varied
            imp = pd.DataFrame({"parameter": ["(not computable)"], "importance": [math.nan], "why": [str(e)]})
    best = ostudy.best_trial if complete else None
    trials = ostudy.trials_dataframe(attrs=("number", "value", "state", "params", "user_attrs"))
    with tracking.resume_run(parent) as r:
        r.log_table(trials, "trials.csv")
        r.log_table(imp, "param_importances.csv")
        if best is not None:
            r.log_dict(best.params, "best_params.json")
            r.log_metrics({f"best/{study.objective_metric}": best.value, "tune/complete": float(len(complete)),
                           "tune/pruned": float(len(pruned))})
            r.set_tags({"best_trial": str(best.number), "best_run": best.user_attrs.get("mlflow_run_id", ""),
                        **{f"best_param/{k}": str(v) for k, v in best.params.items()}})
    return TuneResult(parent, ostudy.study_name, dict(best.params) if best else {}, best.value if best else math.nan,
                      imp, len(complete), len(pruned))
