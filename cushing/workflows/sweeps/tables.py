"""Tables II and III of a sweep (overall and per sex, ranked on validation) from its finished children, at any
time; what a finished pass logs on the parent run (the tables, the retried trials, the best configuration's numbers
under `best/`); and which runs a utility command (promote, compare, dashboard) looks at."""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from cushing import tracking
from cushing.stats.metrics import METRICS
from cushing.workflows.studies import Study, load_study
from cushing.workflows.sweeps.storage import StorageMissing, _study_parent, load_for

__all__ = ["sweep_tables", "report_sweep", "Scope", "default_experiment", "resolve_scope"]


def sweep_tables(parent: str, study: Study) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Table II (overall) and Table III (per sex) from the finished children, ranked on validation."""
    rows2, rows3 = [], []
    metric = study.objective_metric
    latest: dict[str, Any] = {}
    for r in sorted(tracking.find_runs(study.experiment, parent_run_id=parent), key=lambda r: r.start_time):
        if r.status == "FINISHED" and r.tags.get("sweep_config"):
            latest[r.tags["sweep_config"]] = r  # a retried configuration counts once: its last finished run
    for label, r in latest.items():
        m, t = r.metrics, r.tags
        row = {"configuration": label, "model": t.get("model"), "type": t.get("model_type"),
               "freeze": t.get("freeze"), f"rank_by ({metric})": m.get(metric, math.nan)}
        for k in METRICS:
            for name in (f"test/{k}", f"test/{k}/ci_low", f"test/{k}/ci_high"):
                row[name] = m.get(name, math.nan)
        rows2.append({**row, "test_argmax/f1": m.get("test_argmax/f1", math.nan), "run_id": r.run_id})
        for group in ("female", "male"):
            g = {"configuration": label, "model": t.get("model"), "group": group,
                 f"rank_by ({metric})": m.get(metric, math.nan)}
            for k in METRICS:
                v = m.get(f"test/{k}/{group}", math.nan)
                g[f"test/{k}"] = v if math.isfinite(v) else "not estimable"
            rows3.append(g)
    t2, t3 = pd.DataFrame(rows2), pd.DataFrame(rows3)
    if not t2.empty:
        key = f"rank_by ({metric})"
        t2 = t2.sort_values(key, ascending=study.direction == "minimize", na_position="last").reset_index(drop=True)
        t2.insert(0, "rank", range(1, len(t2) + 1))
        order = {c: i for i, c in enumerate(t2["configuration"])}
        t3 = t3.sort_values(["configuration", "group"], key=lambda s: s.map(order) if s.name == "configuration"
                            else s).reset_index(drop=True)
    return t2, t3


def report_sweep(path: str | Path, storage: str | None = None) -> tuple[str | None, pd.DataFrame, pd.DataFrame]:
    """The tables of a sweep from the tracking store, at any time (also while it runs); no parent (None) when the
    study has not been launched in `storage`. A storage that does not exist is a `StorageMissing` error (it is
    read, never created)."""
    study = load_for(path, "sweep")
    parent = _study_parent(study, storage)
    return (parent, *sweep_tables(parent, study)) if parent else (None, pd.DataFrame(), pd.DataFrame())


def _retries(ostudy) -> list[dict]:
    """Trials that retry an earlier one: of a dead worker (Optuna's `failed_trial`) or a stopped one (`retry_of`)."""
    return [{"trial": t.number, "retry_of": of, "config": t.user_attrs.get("label"), "state": t.state.name}
            for t in ostudy.get_trials(deepcopy=False)
            if (of := t.system_attrs.get("failed_trial", t.user_attrs.get("retry_of"))) is not None]


def _log_tables(parent: str, t2: pd.DataFrame, t3: pd.DataFrame, retried: list[dict], seconds: float,
                done: int, n: int) -> None:
    with tracking.resume_run(parent) as r:
        r.log_table(t2, "table2.csv")
        r.log_table(t3, "table3.csv")
        if retried:
            r.log_table(pd.DataFrame(retried), "retried_trials.csv")
        r.log_metrics({"sweep/configurations_done": float(done), "sweep/configurations": float(n),
                       "sweep/retried_trials": float(len(retried)), "sweep/last_pass_seconds": seconds,
                       **_best_of(t2)})


def _best_of(t2: pd.DataFrame) -> dict[str, float]:
    """The top configuration's (ranked on validation) final test results on the parent, under `best/`, so the
    parent shows numbers in the MLflow UI's chart and compare views without expanding the sweep."""
    if t2.empty:
        return {}
    top = t2.iloc[0]
    out = {f"best/{c}": float(top[c]) for c in t2.columns
           if c.startswith("test/") and not c.endswith(("ci_low", "ci_high"))}
    rank_col = next(c for c in t2.columns if c.startswith("rank_by"))
    out[f"best/{rank_col[len('rank_by ('):-1]}"] = float(top[rank_col])
    return {k: v for k, v in out.items() if math.isfinite(v)}


@dataclass(frozen=True)
class Scope:
    """Which runs a utility command (promote, dashboard) looks at, and how that was decided."""

    experiment: str
    parent_run_id: str | None
    how: str


def default_experiment() -> str:
    """MLFLOW_EXPERIMENT_NAME (first, even under `mlflow run`), else `tracking.resolve_experiment`'s: the
    experiment of the run `mlflow run` created, else `cushing`."""
    return os.environ.get("MLFLOW_EXPERIMENT_NAME") or tracking.resolve_experiment(None)


def resolve_scope(*, experiment: str | None = None, parent_run_id: str | None = None, project: str | None = None,
                  storage: str | None = None) -> Scope:
    """The experiment (and sweep parent) a user means: a parent run's own experiment; a study file's experiment
    and the parent run of its study in the Optuna storage; else the experiment named, else the default."""
    if parent_run_id:
        return Scope(tracking.experiment_of_run(parent_run_id), parent_run_id, f"parent run {parent_run_id}")
    if project:
        study = load_study(project)
        try:
            parent = _study_parent(study, storage)
        except StorageMissing:  # nothing launched with this storage: the study file's experiment, read as is
            parent = None
        return Scope(experiment or study.experiment or default_experiment(), parent,
                     f"study {study.path.name}" + (f" (parent run {parent})" if parent else " (not launched yet)"))
    name = experiment or default_experiment()
    return Scope(name, None, f"experiment {name!r}")
