"""Many launchers on one sweep: three `cushing sweep --workers 2` started at the same moment on a fresh store (no
MLflow database, no Optuna schema yet) train each configuration exactly once, on SQLite and on PostgreSQL."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import env_vars

pytestmark = [pytest.mark.slow, pytest.mark.faults]

CONFIGS = [{"model": "resnet18", "label": "a"}, {"model": "resnet18", "label": "b", "batch_size": 16},
           {"model": "resnet18", "label": "c", "lr": 0.01}]


def _study(tmp_path: Path, name: str) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({
        "name": name, "kind": "sweep", "experiment": name,
        "base": {"data": "demo", "pretrained": False, "epochs": 1, "img_size": 32, "bootstrap": 0, "cam": False,
                 "log_model": False, "checkpoint_every": 0},
        "configurations": CONFIGS}))
    return path


def _launch_three(study: Path, env: dict, cwd: Path) -> list[subprocess.CompletedProcess]:
    procs = [subprocess.Popen([sys.executable, "-m", "cushing", "sweep", str(study), "--workers", "2"], cwd=cwd,
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(3)]
    outs = [p.communicate(timeout=900) for p in procs]
    return [subprocess.CompletedProcess(p.args, p.returncode, o, e) for p, (o, e) in zip(procs, outs)]


def _check_exactly_once(results, storage: str, tracking_env: dict, name: str) -> None:
    import mlflow
    import optuna

    for r in results:
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    with env_vars(tracking_env):
        study = optuna.load_study(study_name=next(s for s in optuna.get_all_study_names(storage)
                                                  if s.startswith(f"sweep:{name}:")), storage=storage)
        trials = study.get_trials(deepcopy=False)
    assert sorted(t.user_attrs["label"] for t in trials) == ["a", "b", "c"], "one trial per configuration"
    assert all(t.state.name == "COMPLETE" for t in trials)
    with env_vars(tracking_env):
        c = mlflow.MlflowClient()
        runs = c.search_runs([c.get_experiment_by_name(name).experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get("task") == "sweep"]
    kids = [r for r in runs if r.data.tags.get("sweep_config")]
    assert len(parents) == 1, "one parent run however many launchers"
    assert sorted(k.data.tags["sweep_config"] for k in kids) == ["a", "b", "c"], "one child run per configuration"
    assert all(k.info.status == "FINISHED" for k in kids)
    with env_vars(tracking_env):
        logged = {a.path for a in mlflow.MlflowClient().list_artifacts(parents[0].info.run_id)}
    assert {"table2.csv", "table3.csv"} <= logged
    for r in results:
        assert "Table II" in r.stdout and "Traceback" not in r.stderr


def test_three_launchers_on_a_fresh_sqlite_store(tmp_path, cushing_home):
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}", "CUSHING_HEARTBEAT_S": "2"}
    env.pop("MLFLOW_RUN_ID", None)
    env.pop("CUSHING_OPTUNA_STORAGE", None)
    results = _launch_three(_study(tmp_path, "race-sqlite"), env, tmp_path)
    _check_exactly_once(results, f"sqlite:///{tmp_path / 'optuna.db'}",
                        {"MLFLOW_TRACKING_URI": env["MLFLOW_TRACKING_URI"]}, "race-sqlite")


@pytest.mark.postgres
def test_three_launchers_on_a_fresh_postgres_database(tmp_path, pg_stack, cushing_home):
    import psycopg2

    conn = psycopg2.connect(host="127.0.0.1", port=pg_stack.pg.port, dbname="postgres", user="postgres",
                            password=pg_stack.pg.superuser_password)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute("CREATE DATABASE optuna_race OWNER optuna")
    conn.close()
    storage = pg_stack.storage_for("optuna_race")  # no password in it: libpq reads PGPASSFILE
    env = {**os.environ, **pg_stack.env(), "CUSHING_OPTUNA_STORAGE": storage, "CUSHING_HEARTBEAT_S": "2"}
    env.pop("MLFLOW_RUN_ID", None)
    results = _launch_three(_study(tmp_path, "race-pg"), env, tmp_path)
    _check_exactly_once(results, storage, pg_stack.env(), "race-pg")
