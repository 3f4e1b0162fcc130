"""Many launchers on one sweep: three `cushing sweep --workers 2` started at the same moment on a fresh store (no
MLflow database, no Optuna schema yet) train each configuration exactly once, on SQLite and on PostgreSQL; a trial
left RUNNING without a heartbeat by a worker killed as it started is retried, not waited for; Ctrl-C on a launcher
with workers leaves no trial and no run RUNNING."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import env_vars, foreground_job, fresh_database

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
    labelled = [t for t in trials if "label" in t.user_attrs]  # others: asked as the queue emptied, failed at once
    assert sorted(t.user_attrs["label"] for t in labelled) == ["a", "b", "c"], "one trial per configuration"
    assert all(t.state.name == "COMPLETE" for t in labelled)
    assert all(t.state.name == "FAIL" and "queue_empty" in t.user_attrs for t in trials if t not in labelled)
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
    storage = fresh_database(pg_stack, "optuna_race")
    env = {**os.environ, **pg_stack.env(), "CUSHING_OPTUNA_STORAGE": storage, "CUSHING_HEARTBEAT_S": "2"}
    env.pop("MLFLOW_RUN_ID", None)
    results = _launch_three(_study(tmp_path, "race-pg"), env, tmp_path)
    _check_exactly_once(results, storage, pg_stack.env(), "race-pg")


def _trials(storage: str, name: str) -> list:
    import optuna

    study = optuna.load_study(study_name=next(s for s in optuna.get_all_study_names(storage)
                                              if s.startswith(f"sweep:{name}:")), storage=storage)
    return study.get_trials(deepcopy=False)


def test_a_trial_left_without_a_heartbeat_is_retried(tmp_path, cushing_home):
    """A worker killed between taking its trial and its first heartbeat leaves a RUNNING trial with no heartbeat,
    which Optuna's stale check never fails. Ten grace periods after it started, the next sweep fails it and queues
    it again (as the stale check would), and trains the configuration instead of waiting for it forever (guarded by
    the subprocess timeout)."""
    from optuna.trial import TrialState

    from cushing.workflows.sweeps import open_sweep

    study = _study(tmp_path, "beatless")
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with env_vars({"MLFLOW_TRACKING_URI": uri}):
        h = open_sweep(study, storage=storage)
    try:
        orphan = h.grid.ostudy.ask()  # what the killed worker left: taken from the queue, never beaten
    finally:
        h.grid.close()
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "CUSHING_HEARTBEAT_S": "1", "CUSHING_GRACE_S": "1"}
    env.pop("MLFLOW_RUN_ID", None)
    r = subprocess.run([sys.executable, "-m", "cushing", "sweep", str(study), "--storage", storage, "--workers", "1"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    trials = {t.number: t for t in _trials(storage, "beatless")}
    label = orphan.user_attrs["label"]
    assert trials[orphan.number].state == TrialState.FAIL
    (retry,) = [t for t in trials.values() if t.system_attrs.get("failed_trial") == orphan.number]
    assert retry.state == TrialState.COMPLETE and retry.user_attrs["label"] == label
    done = sorted(t.user_attrs["label"] for t in trials.values() if t.state == TrialState.COMPLETE)
    assert done == ["a", "b", "c"] and "Table II" in r.stdout


def test_ctrl_c_on_a_launcher_leaves_nothing_running(tmp_path, cushing_home):
    """Ctrl-C reaches the launcher and its workers at once (one foreground process group). The launcher lets the
    workers finish their own clean-up (trial failed as interrupted, MLflow run KILLED) before anything else, so no
    second signal lands in it: nothing is left RUNNING, and the stopped configurations stay retryable."""
    import mlflow
    from optuna.trial import TrialState

    from cushing import tracking
    from cushing.workflows.sweeps import open_sweep, sweep_status

    study = tmp_path / "ctrlc.yaml"
    study.write_text(yaml.safe_dump({
        "name": "ctrlc", "kind": "sweep", "experiment": "ctrlc",
        "base": {"data": "demo", "pretrained": False, "epochs": 200, "img_size": 32, "bootstrap": 0, "cam": False,
                 "log_model": False, "checkpoint_every": 0},
        "configurations": CONFIGS[:2]}))
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "CUSHING_HEARTBEAT_S": "1"}
    env.pop("MLFLOW_RUN_ID", None)
    proc = subprocess.Popen([sys.executable, "-m", "cushing", "sweep", str(study), "--storage", storage, "--workers",
                             "2"], cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=foreground_job)  # its own group, as a terminal's foreground job
    deadline, training = time.time() + 300, []
    try:
        while time.time() < deadline and len(training) < 2 and proc.poll() is None:
            time.sleep(0.5)
            try:
                with env_vars({"MLFLOW_TRACKING_URI": uri}):
                    c = tracking.client()  # waits for the launcher's creation of the store (its lock)
                    exp = c.get_experiment_by_name("ctrlc")
                    runs = c.search_runs([exp.experiment_id]) if exp else []
            except Exception:  # the store does not exist yet
                continue
            training = [r for r in runs if r.info.status == "RUNNING" and "epoch/train/loss" in r.data.metrics]
        if len(training) < 2:
            proc.kill()
            out, err = proc.communicate()
            pytest.fail(f"both workers did not start training:\n{out[-2000:]}\n{err[-3000:]}")
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in the terminal does
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 130, out[-2000:] + err[-3000:]
    assert err.count("cushing sweep: stopped by SIGINT") == 3, "the launcher and both workers stopped on the SIGINT\n" \
        + err[-3000:]
    assert "SIGTERM" not in err and "Traceback" not in err, "no second signal reached a worker\n" + err[-3000:]
    with env_vars({"MLFLOW_TRACKING_URI": uri}):
        c = mlflow.MlflowClient()
        runs = c.search_runs([c.get_experiment_by_name("ctrlc").experiment_id])
        kids = [r for r in runs if r.data.tags.get("sweep_config")]
        assert sorted(r.data.tags["sweep_config"] for r in kids) == ["a", "b"]
        assert all(r.info.status == "KILLED" for r in kids), [(r.data.tags["sweep_config"], r.info.status) for r in kids]
        trials = _trials(storage, "ctrlc")
        assert sorted(t.user_attrs["label"] for t in trials) == ["a", "b"]
        assert all(t.state == TrialState.FAIL and "interrupted" in t.user_attrs for t in trials), \
            [(t.number, t.state.name, dict(t.user_attrs)) for t in trials]
        h = open_sweep(study, storage=storage)
        try:
            status = sweep_status(h)
        finally:
            h.grid.close()
    assert status["failed"] == [] and not status["finished"], "both stopped configurations train on the next launch"
