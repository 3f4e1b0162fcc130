"""Sweeps (the paper's grid) and tuning, on Optuna's RDB storage so that many processes or hosts share one study.

Sweep: every configuration of the study file is trained exactly once, however many launchers and workers share
the storage. A worker claims a configuration by inserting (study, configuration, attempt) into a table whose
primary key lets one inserter win (`claims.GridClaims`), then creates the Optuna trial itself with the
configuration's real fields as parameters (every training option that varies across the grid: model, freeze,
batch_size, ...; the configuration's label is the trial's user attribute `label`), so optuna-dashboard and
`optuna trials` read sensibly. The trial beats from the moment it exists; its worker then checks that nobody took
the configuration over while it was starting (a later attempt claimed, another of its trials running) and gives
it up if so. A worker that dies stops beating; its trial is failed after the grace period and the configuration
is claimed again (attempt + 1) by a worker still alive: workers wait while others train, so a death is always
picked up. A trial left RUNNING with no heartbeat at all (its worker died between creating and beating it) is given
one by the next worker, so that it goes stale like any other. A configuration whose training raised is failed and
not retried (the error would repeat); one whose workers died more than MAX_RETRY times is failed for good. Stops
(Ctrl-C, SIGTERM, a Slurm preemption) are not failures: an interrupted attempt is retried by the next launch and
does not count against MAX_RETRY. Rerunning a finished sweep trains nothing.
Tune: TPE with median or successive-halving pruning on the per-epoch validation metric.
Every trial is a child MLflow run under one parent run per study. Optuna is imported here only.

Owns: `storage` (Optuna imported only here; the storage, the study's name, loading a study file for a command),
`claims` (exactly-once claims in the sweep's database), `parent` (the study's parent run, created once), `grid`
(the open grid, each configuration's attempts, a claimed attempt's trial), `watch` (trial heartbeats, stale and
beatless trials, orphaned runs), `worker` (claim, train, repeat), `launcher` (open, local worker processes and
their stops, finish, the plan), `tables` (Tables II and III, what a pass logs on the parent), `scope` (which runs
promote, compare and dashboard look at), `tune` (TPE with pruning). May import `cushing.workflows.studies`,
`experiment` and `plan`, and every subpackage below workflows; MLflow only through `cushing.tracking`.
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
