"""Which runs a utility command (promote, compare, dashboard) looks at: a parent run's experiment, a study file's
experiment and its sweep's parent run, or the experiment named (else the default)."""
from __future__ import annotations

import os
from dataclasses import dataclass

from cushing import tracking
from cushing.workflows.studies import load_study
from cushing.workflows.sweeps.parent import _study_parent
from cushing.workflows.sweeps.storage import StorageMissing

__all__ = ["Scope", "default_experiment", "resolve_scope"]


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
