"""Sweeps (the paper's grid) and tuning, on Optuna's RDB storage so that many processes or hosts share one study.

Sweep: every configuration is trained exactly once on Optuna's own queue: the grid is enqueued once
(`enqueue_trial(skip_if_exists=True)`, under the storage's lock), its label and varying fields as parameters.
Workers `ask()` and `tell()`; a trial beats while it trains. A dead worker's trial goes stale and
`RetryHeartbeatStaleTrialCallback` queues it again, at most MAX_RETRY times. A training error is not retried (it
would repeat). A stop (Ctrl-C, SIGTERM, preemption) is no failure: the trial is queued again, not counted. A
configuration whose run FINISHED is never trained again. Tune: TPE with median or successive-halving pruning.
Every trial is a child MLflow run under one parent run per study.

Owns: `storage` (Optuna, imported only here; the study's name, parent run and queue, where each configuration
stands), `worker`, `launcher`, `tables` (Tables II and III; the scope utility commands look at),
`tune`. May import `cushing.workflows.studies`, `experiment` and `plan`, every subpackage below workflows; MLflow
only through `cushing.tracking`. The names of `worker` and `tune` are imported on first use: they bring torch, which
a launcher of worker processes, a plan or a report does not need.
"""
from __future__ import annotations

from importlib import import_module

from cushing.workflows.sweeps.launcher import SweepHandle, SweepResult, auto_workers, finish_sweep, open_sweep, \
    plan_sweep, run_sweep, sweep_status
from cushing.workflows.sweeps.storage import MAX_RETRY, StorageMissing, default_storage, grid_parameters, load_for
from cushing.workflows.sweeps.tables import Scope, default_experiment, report_sweep, resolve_scope, sweep_tables

_LAZY = {"sweep_worker": "worker",
         **dict.fromkeys(("TuneHandle", "TuneResult", "finish_tune", "open_tune", "run_tune"), "tune")}

__all__ = ["run_sweep", "run_tune", "default_storage", "sweep_tables", "report_sweep", "SweepResult", "load_for",
           "plan_sweep", "auto_workers", "sweep_worker", "resolve_scope", "Scope", "default_experiment",
           "SweepHandle", "open_sweep", "sweep_status", "finish_sweep", "TuneHandle", "open_tune", "finish_tune",
           "StorageMissing", "TuneResult", "MAX_RETRY", "grid_parameters"]


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f"{__name__}.{_LAZY[name]}"), name)
