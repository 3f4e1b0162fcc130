"""Tables II and III of a sweep (overall and per sex, ranked on validation) from its finished children, at any
time, and what a finished pass logs on the parent run: the tables, the retried trials, the best configuration's
numbers under `best/`."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pandas as pd

from cushing import tracking
from cushing.stats.metrics import METRICS
from cushing.workflows.studies import Study
from cushing.workflows.sweeps.parent import _study_parent
from cushing.workflows.sweeps.storage import load_for

__all__ = ["sweep_tables", "report_sweep"]


def _children(parent: str, experiment: str) -> list:
    runs = tracking.find_runs(experiment, parent_run_id=parent)
    return [r for r in runs if r.status == "FINISHED" and r.tags.get("sweep_config")]


def sweep_tables(parent: str, study: Study) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Table II (overall) and Table III (per sex) from the finished children, ranked on validation."""
    rows2, rows3 = [], []
    metric = study.objective_metric
    latest: dict[str, Any] = {}
    for r in sorted(_children(parent, study.experiment), key=lambda r: r.start_time):
        latest[r.tags["sweep_config"]] = r  # a retried configuration counts once: its last finished run
    for label, r in latest.items():
        m, t = r.metrics, r.tags
        row = {"configuration": label, "model": t.get("model"), "type": t.get("model_type"),
               "freeze": t.get("freeze"), f"rank_by ({metric})": m.get(metric, math.nan)}
        for k in METRICS:
            row[f"test/{k}"] = m.get(f"test/{k}", math.nan)
            row[f"test/{k}/ci_low"] = m.get(f"test/{k}/ci_low", math.nan)
            row[f"test/{k}/ci_high"] = m.get(f"test/{k}/ci_high", math.nan)
        row["test_argmax/f1"] = m.get("test_argmax/f1", math.nan)
        row["run_id"] = r.run_id
        rows2.append(row)
        for group in ("female", "male"):
            g = {"configuration": label, "model": t.get("model"), "group": group,
                 f"rank_by ({metric})": m.get(metric, math.nan)}
            for k in METRICS:
                v = m.get(f"test/{k}/{group}", math.nan)
                g[f"test/{k}"] = v if math.isfinite(v) else "not estimable"
            rows3.append(g)
    t2 = pd.DataFrame(rows2)
    t3 = pd.DataFrame(rows3)
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
    if not parent:
        return None, pd.DataFrame(), pd.DataFrame()
    t2, t3 = sweep_tables(parent, study)
    return parent, t2, t3


def _retries(ostudy) -> list[dict]:
    """Trials that retry an earlier one: of a dead worker (Optuna's `failed_trial`) or a stopped one (`retry_of`)."""
    out = []
    for t in ostudy.get_trials(deepcopy=False):
        of = t.system_attrs.get("failed_trial", t.user_attrs.get("retry_of"))
        if of is not None:
            out.append({"trial": t.number, "retry_of": of, "config": t.user_attrs.get("label"), "state": t.state.name})
    return out


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
    out = {f"best/{c}": float(top[c]) for c in t2.columns if c.startswith("test/") and not c.endswith(("ci_low",
                                                                                                   "ci_high"))}
    rank_col = next(c for c in t2.columns if c.startswith("rank_by"))
    out[f"best/{rank_col[len('rank_by ('):-1]}"] = float(top[rank_col])
    return {k: v for k, v in out.items() if math.isfinite(v)}
