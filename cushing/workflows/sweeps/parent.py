"""The study's MLflow parent run: created once, by the first launcher (under the storage's lock, held by whoever
opens the study), recorded in the Optuna study so every worker and host logs its children under it, and found
again from a study file."""
from __future__ import annotations

from cushing import tracking
from cushing.workflows.studies import Study
from cushing.workflows.sweeps.storage import _optuna, _read_storage, _study_name, default_storage

__all__ = ["PARENT_ATTR"]

PARENT_ATTR = "mlflow_parent_run"


def _parent_run(ostudy, study: Study, parent_run_id: str | None) -> str:
    """The study's parent run: `parent_run_id` when given, else the one recorded, else a new one (the run `mlflow
    run` created for this launch, when there is one). Called under the storage's lock."""
    if parent_run_id:
        if ostudy.user_attrs.get(PARENT_ATTR) != parent_run_id:
            ostudy.set_user_attr(PARENT_ATTR, parent_run_id)
        return parent_run_id
    existing = ostudy.user_attrs.get(PARENT_ATTR)  # read from the storage
    if existing:
        return existing
    with tracking.start_run(experiment=study.experiment, run_name=f"{study.kind}-{study.name}",
                            tags={"task": study.kind, "study": ostudy.study_name, "study_file": study.path.name}
                            ) as parent:
        parent.log_dict({"study": ostudy.study_name, "file": study.path.read_text()}, "study.json")
    ostudy.set_user_attr(PARENT_ATTR, parent.run_id)
    return parent.run_id


def _study_parent(study: Study, storage: str | None) -> str | None:
    """The parent run of a study file's Optuna study in `storage`, if it has been launched. The storage is read,
    never created: a missing one is a `StorageMissing` error."""
    optuna = _optuna()
    with _read_storage(storage or default_storage()) as rdb:
        try:
            ostudy = optuna.load_study(study_name=_study_name(study), storage=rdb)
        except KeyError:
            return None
        return ostudy.user_attrs.get(PARENT_ATTR)
