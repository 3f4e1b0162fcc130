"""The one place that logs runs to MLflow (the release package handles registry and serving).

Tracking URI: MLFLOW_TRACKING_URI when set, else the embedded default: `sqlite:///mlflow.db` with artifacts in
`./mlruns`, both in the working directory (MLflow's own default, made explicit).

Metric names: one name, one meaning. Per-epoch series live under `epoch/` with step = epoch (`epoch/val/f1`, ...):
the UI draws them as curves in their own chart section. Final results (best epoch, operating threshold chosen on
validation) keep the contract names (`val/f1`, `test/f1/female`, `test/f1/ci_low`, ...), logged once at step 0: the
UI shows them as single values that the compare view lines up across runs.

Runs started by `mlflow run` (MLFLOW_RUN_ID set) are used as they are: every entry point logs into that run
(MLflow's multistep-workflow convention) instead of opening a second one. Runs are named by id in every call: none is
MLflow's active run, and no environment variable is written after start-up.

Owns: `connection` (URI, reachability check, client, another store for a block), `runs` (a run's life), `logger`
(`RunLogger`), `records` (`RunRecord`), `queries` (runs read, tagged, ended, reaped and found by id or tags),
`liveness` (heartbeats, process identity), `stores` (SQLite paths, first-use locks). Imports mlflow (inside
functions), nothing of the package but `cushing.config`; with `cushing.release`, the only place that touches an
MLflow object.
"""
from __future__ import annotations

from cushing.tracking.connection import HTTP_RETRY_DEFAULTS, TrackingUnavailable, artifact_dir, check_reachable, \
    client, configure, http_defaults, tracking_uri, using_store
from cushing.tracking.liveness import machine_id
from cushing.tracking.logger import EPOCH_PREFIX, RunLogger
from cushing.tracking.queries import download_artifact, end_run_as, experiment_id, experiment_of_run, \
    experiments_with_runs, find_finished, find_runs, get_run, last_step, list_artifacts, log_artifacts_to, reap, \
    runs_link, set_tags
from cushing.tracking.records import RunRecord
from cushing.tracking.runs import ERROR_TAG, env_run_id, launcher_run, log_into, offer_run, resolve_experiment, \
    resume_run, start_run

__all__ = ["tracking_uri", "configure", "RunLogger", "start_run", "artifact_dir", "HTTP_RETRY_DEFAULTS",
           "find_runs", "download_artifact", "get_run", "resume_run", "experiment_id", "using_store", "EPOCH_PREFIX",
           "env_run_id", "experiments_with_runs", "experiment_of_run", "reap", "check_reachable",
           "TrackingUnavailable", "last_step", "log_artifacts_to", "RunRecord", "set_tags", "end_run_as",
           "list_artifacts", "log_into", "client", "machine_id", "find_finished", "offer_run", "launcher_run",
           "http_defaults", "ERROR_TAG", "resolve_experiment", "runs_link"]
