"""Sweeps (the paper's grid) and tuning, on Optuna's RDB storage so that many processes or hosts share one study.

Sweep: every configuration of the study file is trained exactly once, however many launchers and workers share
the storage, on Optuna's own queue: the grid is enqueued once (`enqueue_trial(skip_if_exists=True)`, under the
storage's lock), with the configuration's label and its real fields as parameters, so optuna-dashboard and `optuna
trials` read sensibly. Workers take trials with `study.ask()` and tell values with `study.tell()` on their own
thread; a trial beats while it trains. A worker that dies stops beating: Optuna's stale check fails its trial and
`RetryHeartbeatStaleTrialCallback` queues it again, at most MAX_RETRY times, for a live worker (workers wait while
others train the last ones). A configuration whose training raised is failed and not retried (the error would
repeat). Stops (Ctrl-C, SIGTERM, a Slurm preemption) are not failures: an interrupted trial is queued again by a
live worker or the next launch, without counting against MAX_RETRY. A configuration whose run FINISHED is never
trained again. Rerunning a finished sweep trains nothing.
Tune: Optuna's optimize, TPE with median or successive-halving pruning on the per-epoch validation metric.
Every trial is a child MLflow run under one parent run per study. Optuna is imported here only.

Owns: `storage` (Optuna imported only here; the storage, the study's name, loading a study file for a command),
`parent` (the study's parent run, created once), `grid` (the open grid on the queue, where each configuration
stands), `worker` (ask, train, tell, repeat; stale, stopped and beatless trials), `launcher` (open, local worker
processes and their stops, finish, the plan), `tables` (Tables II and III, what a pass logs on the parent),
`scope` (which runs promote, compare and dashboard look at), `tune` (TPE with pruning). May import
`cushing.workflows.studies`, `experiment` and `plan`, and every subpackage below workflows; MLflow only through
`cushing.tracking`.
"""
from __future__ import annotations

from cushing.workflows.sweeps.grid import grid_parameters
from cushing.workflows.sweeps.launcher import SweepHandle, SweepResult, auto_workers, finish_sweep, open_sweep, \
    plan_sweep, run_sweep, sweep_status
from cushing.workflows.sweeps.scope import Scope, default_experiment, resolve_scope
from cushing.workflows.sweeps.storage import MAX_RETRY, StorageMissing, default_storage, load_for
from cushing.workflows.sweeps.tables import report_sweep, sweep_tables
from cushing.workflows.sweeps.tune import TuneHandle, TuneResult, finish_tune, open_tune, run_tune
from cushing.workflows.sweeps.worker import sweep_worker

__all__ = ["run_sweep", "run_tune", "default_storage", "sweep_tables", "report_sweep", "SweepResult", "load_for",
           "plan_sweep", "auto_workers", "sweep_worker", "resolve_scope", "Scope", "default_experiment",
           "SweepHandle", "open_sweep", "sweep_status", "finish_sweep", "TuneHandle", "open_tune", "finish_tune",
           "StorageMissing", "TuneResult", "MAX_RETRY", "grid_parameters"]
