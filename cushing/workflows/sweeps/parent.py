"""The study's MLflow parent run: created exactly once (a claim) by the first launcher, recorded in the Optuna
study so every worker and host logs its children under it, and found again from a study file."""
from __future__ import annotations

import time

from cushing import tracking
from cushing.workflows.studies import Study
from cushing.workflows.sweeps.claims import GridClaims
from cushing.workflows.sweeps.storage import _optuna, _read_storage, _study_name, default_storage

__all__ = ["PARENT_KEY", "PARENT_CLAIM_TIMEOUT_S"]


PARENT_KEY = "__parent_run__"  # the claim of creating a study's MLflow parent run
PARENT_CLAIM_TIMEOUT_S = 300.0  # a parent claim this old whose run was never recorded is claimed again


def _parent_run(ostudy, study: Study, claims: GridClaims, parent_run_id: str | None) -> str:
    """One MLflow parent run per Optuna study, recorded in the study so every worker and host logs under it.

    Exactly one launcher creates it (a claim); the parent is the run `mlflow run` created when there is one. The
    others wait for it to be recorded. A launcher that fails to create it (tracking server unreachable, refused,
    Ctrl-C) releases its claim, so the next launch creates it; a claim older than PARENT_CLAIM_TIMEOUT_S whose
    run was never recorded (its launcher was killed) is claimed again (attempt + 1) by a waiting launcher."""
    if parent_run_id:
        ostudy.set_user_attr("mlflow_parent_run", parent_run_id)
        return parent_run_id
    name, said = ostudy.study_name, False
    while True:
        existing = ostudy.user_attrs.get("mlflow_parent_run")  # read from the storage each time
        if existing:
            return existing
        last = claims.latest(name, PARENT_KEY)
        age = time.time() - last[1] if last else 0.0
        attempt = 0 if last is None else last[0] + 1 if age > PARENT_CLAIM_TIMEOUT_S else None
        if attempt is not None and claims.claim(name, PARENT_KEY, attempt):
            existing = ostudy.user_attrs.get("mlflow_parent_run")  # recorded late by a launcher thought dead
            return existing or _create_parent(ostudy, study, claims, attempt)
        if last and age > 10 and not said:
            print(f"[{study.kind} {study.name}] waiting for another launcher to create the parent run (claimed "
                  f"{age:.0f} s ago; claimed here if not recorded within {PARENT_CLAIM_TIMEOUT_S:.0f} s)", flush=True)
            said = True
        time.sleep(0.5)


def _create_parent(ostudy, study: Study, claims: GridClaims, attempt: int) -> str:
    """Create the parent run under this launcher's claim and record it in the study; on any failure give the
    claim back, so that a later launch is not left waiting for a parent that will never be recorded."""
    try:
        env = tracking.env_run_id()  # `mlflow run`'s run becomes the parent when it is in the study's experiment
        same = env is not None and tracking.experiment_of_run(env) == study.experiment
        with tracking.start_run(experiment=study.experiment, run_name=f"{study.kind}-{study.name}",
                                use_env_run=same, tags={"task": study.kind, "study": ostudy.study_name,
                                                        "study_file": study.path.name}) as parent:
            parent.log_dict({"study": ostudy.study_name, "file": study.path.read_text()}, "study.json")
            run_id = parent.run_id
        ostudy.set_user_attr("mlflow_parent_run", run_id)
    except BaseException:
        try:
            claims.release(ostudy.study_name, PARENT_KEY, attempt)
        except Exception:  # the storage is unreachable too: a later launch reclaims it after the timeout
            pass
        raise
    return run_id


def _study_parent(study: Study, storage: str | None) -> str | None:
    """The parent run of a study file's Optuna study in `storage`, if it has been launched. The storage is read,
    never created: a missing one is a `StorageMissing` error."""
    optuna = _optuna()
    with _read_storage(storage or default_storage()) as rdb:
        try:
            ostudy = optuna.load_study(study_name=_study_name(study), storage=rdb)
        except KeyError:
            return None
        return ostudy.user_attrs.get("mlflow_parent_run")
