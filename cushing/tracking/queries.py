"""Runs read and marked by id, from any process and without touching this process's active run: records, tags,
ends, artifacts, searches. A search marks FAILED the RUNNING runs whose process died (`reap`), so the next command
that meets a SIGKILLed run cleans it up."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Mapping

from cushing.tracking.connection import client, configure, tracking_uri
from cushing.tracking.liveness import _dead_because
from cushing.tracking.records import RunRecord, _record
from cushing.tracking.stores import sqlite_path

__all__ = ["experiment_id", "runs_link", "get_run", "set_tags", "end_run_as", "list_artifacts", "find_runs", "reap",
           "experiments_with_runs", "log_artifacts_to", "last_step", "experiment_of_run", "download_artifact",
           "find_finished"]


KIND_TAG = "mlflow.experimentKind"  # the experiment's kind, as the MLflow 3 UI's experiment-type selector writes it
MODEL_DEVELOPMENT = "custom_model_development"  # the selector's "Machine learning" (else genai_development)


def experiment_id(name: str) -> str:
    """The id of an experiment, created (with the server's default artifact location) when missing, and marked as
    model development unless it has a kind already (a user's choice stays), e.g. one `mlflow run
    --experiment-name` created.

    Unlike mlflow.set_experiment this leaves no process-wide state behind (it would export MLFLOW_EXPERIMENT_ID
    to every subprocess, which then clashes with `mlflow run --experiment-name`).
    """
    c = client()
    exp = c.get_experiment_by_name(name)
    if exp is None:
        try:
            return c.create_experiment(name, tags={KIND_TAG: MODEL_DEVELOPMENT})
        except Exception:  # another worker created it first
            exp = c.get_experiment_by_name(name)
            if exp is None:
                raise
    if not exp.tags.get(KIND_TAG):
        c.set_experiment_tag(exp.experiment_id, KIND_TAG, MODEL_DEVELOPMENT)
    return exp.experiment_id


def runs_link(experiment: str) -> str:
    """The experiment's runs table in the MLflow UI: the tracking server's, else where `mlflow ui` serves the
    embedded store. MLflow 3.17's UI opens every experiment on its GenAI overview unless its sidebar is in "Model
    training" mode (kept in the browser, not on the experiment): the link asks for that mode."""
    from urllib.parse import urlsplit

    u = urlsplit(tracking_uri())
    base = f"{u.scheme}://{u.netloc.rpartition('@')[2]}{u.path.rstrip('/')}" if u.scheme in ("http", "https") \
        else "http://127.0.0.1:5000"  # no password shown
    return f"{base}/#/experiments/{experiment_id(experiment)}/runs?workflowType=machine_learning"


def get_run(run_id: str) -> RunRecord:
    return _record(client().get_run(run_id))


def set_tags(run_id: str, tags: Mapping[str, Any]) -> None:
    """Tag any run, open or not, without touching the active run of this process."""
    c = client()
    for k, v in tags.items():
        c.set_tag(run_id, k, str(v))


def end_run_as(run_id: str, status: str, tags: Mapping[str, Any] | None = None) -> None:
    """Mark a run ended (FAILED, KILLED, FINISHED) from outside its process, with tags saying why."""
    if tags:
        set_tags(run_id, tags)
    client().set_terminated(run_id, status)


def list_artifacts(run_id: str, path: str | None = None) -> list[str]:
    """Artifact paths of a run (one folder level), e.g. ['cam/mean_all.png', 'cam/overlays']."""
    return [a.path for a in client().list_artifacts(run_id, path)]


def find_runs(experiment: str, *, filter_string: str = "", parent_run_id: str | None = None,
              max_results: int = 5000) -> list[RunRecord]:
    """Runs of an experiment (optionally the children of one parent), newest first; dead ones reaped on the way."""
    c = client()
    exp = c.get_experiment_by_name(experiment)
    if exp is None:
        return []
    f = " and ".join(filter(None, [filter_string, parent_run_id and f"tags.mlflow.parentRunId = '{parent_run_id}'"]))

    def search() -> list[RunRecord]:
        return [_record(r) for r in c.search_runs([exp.experiment_id], filter_string=f, max_results=max_results,
                                                   order_by=["attributes.start_time DESC"])]
    runs = search()
    return search() if reap(runs) else runs


def find_finished(experiment: str, tags: Mapping[str, str]) -> list[RunRecord]:
    """FINISHED runs of an experiment carrying every tag given (e.g. a pipeline step's key), newest first. Only
    reads: an embedded store or an experiment that does not exist yet is not created (nothing is found), and no
    run is reaped, so that a plan can ask it and write nothing."""
    path = sqlite_path(tracking_uri())
    if path is not None and not path.exists():
        return []
    c = client()
    exp = c.get_experiment_by_name(experiment)
    if exp is None:
        return []
    f = " and ".join([f"tags.`{k}` = '{v}'" for k, v in tags.items()] + ["attributes.status = 'FINISHED'"])
    return [_record(r) for r in c.search_runs([exp.experiment_id], filter_string=f, max_results=1000,
                                              order_by=["attributes.start_time DESC"])]


def experiments_with_runs() -> list[tuple[str, int]]:
    """(experiment name, number of runs) for every experiment holding runs, most runs first: what an empty
    experiment's error message offers instead."""
    c = client()
    counts = [(e.name, len(c.search_runs([e.experiment_id], max_results=1000))) for e in c.search_experiments()]
    return sorted([t for t in counts if t[1]], key=lambda t: -t[1])


def log_artifacts_to(run_id: str, folder: str | Path, artifact_path: str | None = None) -> None:
    """Add files to any run, open or not, without touching the active run of this process."""
    client().log_artifacts(run_id, str(folder), artifact_path)


def last_step(run_id: str, key: str) -> int:
    """The highest step logged for a metric of a run (0 when none)."""
    return max((m.step for m in client().get_metric_history(run_id, key)), default=0)


def experiment_of_run(run_id: str) -> str:
    c = client()
    return c.get_experiment(c.get_run(run_id).info.experiment_id).name


def download_artifact(run_id: str, path: str, dst: str | Path) -> Path:
    import mlflow

    configure()
    return Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path, dst_path=str(dst)))


def reap(runs: list["RunRecord"]) -> int:
    """Mark FAILED, with a `cushing.died` tag saying why, every RUNNING run whose process died (SIGKILL, OOM, a
    lost node): the run's own host and pid are gone, or its heartbeat is older than CUSHING_RUN_STALE_S. Returns
    how many were marked."""
    now, n = time.time(), 0
    for r in runs:
        if why := _dead_because(r, now):
            end_run_as(r.run_id, "FAILED", {"cushing.died": why})
            n += 1
    return n
