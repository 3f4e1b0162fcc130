"""Sweeps and tuning on Optuna's RDB storage: a 2-worker sweep with no duplicates, resume, a SIGKILLed worker's
configuration retried, tuning with pruning as nested runs, and the same on PostgreSQL."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from tests.conftest import ROOT, env_vars

pytestmark = pytest.mark.slow


# ------------------------------------------------------------------------------------------------ sweep

def _children(uri: str, experiment: str):
    from cushing import tracking

    with env_vars({"MLFLOW_TRACKING_URI": uri}):
        c = tracking.client()  # a store still being created is waited for (its lock), never migrated in a race
        exp = c.get_experiment_by_name(experiment)
        runs = c.search_runs([exp.experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get("task") == "sweep"]
    kids = [r for r in runs if r.data.tags.get("sweep_config")]
    return parents, kids, runs


def test_two_workers_cover_the_grid_once(demo_sweep):
    parents, kids, _ = _children(demo_sweep["uri"], "cushing-demo")
    assert len(parents) == 1
    assert all(k.data.tags["mlflow.parentRunId"] == parents[0].info.run_id for k in kids)
    finished = [k for k in kids if k.info.status == "FINISHED"]
    labels = sorted(k.data.tags["sweep_config"] for k in finished)
    assert labels == ["dinov2_s-frozen", "resnet18", "resnet18-bs16"], "one finished run per configuration"
    assert len(kids) == 3, "no configuration trained twice"
    import mlflow

    with env_vars({"MLFLOW_TRACKING_URI": demo_sweep["uri"]}):
        pid = parents[0].info.run_id
        t2 = pd.read_csv(mlflow.artifacts.download_artifacts(run_id=pid, artifact_path="table2.csv"))
        t3 = pd.read_csv(mlflow.artifacts.download_artifacts(run_id=pid, artifact_path="table3.csv"))
    assert len(t2) == 3 and t2["rank"].tolist() == [1, 2, 3]
    rank_col = next(c for c in t2.columns if c.startswith("rank_by"))
    assert t2[rank_col].is_monotonic_decreasing
    assert {"test/f1", "test/f1/ci_low", "test/recall", "test/auc"} <= set(t2.columns)
    assert len(t3) == 6 and set(t3["group"]) == {"female", "male"}
    assert "Table II" in demo_sweep["stdout"]


def test_rerunning_a_finished_sweep_trains_nothing(demo_sweep):
    from cushing.workflows.sweeps import run_sweep

    _, before, _ = _children(demo_sweep["uri"], "cushing-demo")
    with env_vars({"MLFLOW_TRACKING_URI": demo_sweep["uri"]}):
        res = run_sweep(ROOT / "projects" / "demo.yaml", storage=demo_sweep["storage"], progress=False)
    _, after, _ = _children(demo_sweep["uri"], "cushing-demo")
    assert res.trained == 0 and len(after) == len(before)
    assert len(res.table2) == 3


def test_report_prints_tables_from_the_store(demo_sweep, capsys):
    from cushing.cli import main

    with env_vars({"MLFLOW_TRACKING_URI": demo_sweep["uri"]}):
        rc = main(["sweep", str(ROOT / "projects" / "demo.yaml"), "--report", "--storage", demo_sweep["storage"]])
    out = capsys.readouterr().out
    assert rc == 0 and "Table II" in out and "Table III" in out and "resnet18-bs16" in out


def _small_sweep(tmp_path: Path, name: str, epochs: int = 2) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({
        "name": name, "kind": "sweep", "experiment": name,
        "base": {"data": "demo", "pretrained": False, "epochs": epochs, "img_size": 48, "bootstrap": 0, "cam": False,
                 "log_model": False},
        "configurations": [{"model": "resnet18", "label": "a"}, {"model": "resnet18", "label": "b", "lr": 0.01}]}))
    return path


def test_a_killed_worker_is_retried_and_completed(tmp_path, cushing_home):
    """SIGKILL a worker mid-trial; the next run fails the stale trial, re-queues it and completes it."""
    from cushing.workflows.sweeps import run_sweep

    study = _small_sweep(tmp_path, "killtest", epochs=4)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "CUSHING_HEARTBEAT_S": "1", "CUSHING_GRACE_S": "4"}
    env.pop("MLFLOW_RUN_ID", None)
    proc = subprocess.Popen([sys.executable, "-m", "cushing", "sweep", str(study), "--storage", storage], cwd=tmp_path,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 240
    running = []
    while time.time() < deadline and not running:
        time.sleep(0.5)
        try:
            _, kids, _ = _children(uri, "killtest")
        except Exception:  # the store or experiment does not exist yet
            continue
        running = [k for k in kids if k.info.status == "RUNNING" and "epoch/train/loss" in k.data.metrics]
    assert running, "the worker never started training"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(10)
    with env_vars({"MLFLOW_TRACKING_URI": uri, "CUSHING_HEARTBEAT_S": "1", "CUSHING_GRACE_S": "4"}):
        res = run_sweep(study, storage=storage, progress=False)
    assert len(res.retried) == 1 and res.retried[0]["state"] == "COMPLETE"
    _, kids, _ = _children(uri, "killtest")
    finished = sorted(k.data.tags["sweep_config"] for k in kids if k.info.status == "FINISHED")
    assert finished == ["a", "b"]
    orphan = next(k for k in kids if k.info.run_id == running[0].info.run_id)
    assert orphan.info.status == "FAILED" and "is gone" in orphan.data.tags["cushing.died"]


# ------------------------------------------------------------------------------------------------ tune

def _tune_file(tmp_path: Path, name: str, trials: int, epochs: int = 3) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({
        "name": name, "kind": "tune", "experiment": name,
        "base": {"data": "demo", "model": "resnet18", "pretrained": False, "epochs": epochs, "img_size": 48,
                 "bootstrap": 0, "cam": False, "log_model": False},
        "objective": {"metric": "val/auc"}, "n_trials": trials,
        "sampler": {"type": "tpe", "seed": 0, "n_startup_trials": 2},
        "pruner": {"type": "median", "n_startup_trials": 1, "n_warmup_steps": 0},
        "space": {"lr": {"type": "float", "low": 1e-4, "high": 0.05, "log": True},
                  "aug_strength": {"type": "float", "low": 0.0, "high": 1.5}}}))
    return path


def _check_tune(res, uri: str, experiment: str, trials: int) -> None:
    import mlflow

    with env_vars({"MLFLOW_TRACKING_URI": uri}):
        c = mlflow.MlflowClient()
        exp = c.get_experiment_by_name(experiment)
        runs = c.search_runs([exp.experiment_id], max_results=100)
        parent = c.get_run(res.parent_run_id)
        names = {a.path for a in c.list_artifacts(res.parent_run_id)}
    kids = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == res.parent_run_id]
    assert len(kids) == trials and res.n_complete + res.n_pruned == trials
    assert {"best_params.json", "param_importances.csv", "trials.csv"} <= names
    assert set(res.best_params) == {"lr", "aug_strength"}
    assert parent.data.tags["best_param/lr"] == str(res.best_params["lr"])
    assert "best/val/auc" in parent.data.metrics
    pruned = [k for k in kids if "pruned" in k.data.tags]
    assert len(pruned) == res.n_pruned


def test_tune_with_pruning_nests_trials_under_one_parent(tmp_path, cushing_home):
    from cushing.workflows.sweeps import run_tune

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with env_vars({"MLFLOW_TRACKING_URI": uri}):
        res = run_tune(_tune_file(tmp_path, "tunetest", 4), storage=f"sqlite:///{tmp_path / 'optuna.db'}",
                       progress=False)
    _check_tune(res, uri, "tunetest", 4)
    assert res.n_pruned >= 1, "the median pruner stopped at least one trial early"


@pytest.mark.postgres
def test_sweep_and_tune_on_postgres_storage(pg_stack, tmp_path, cushing_home):
    import psycopg2

    from cushing.workflows.sweeps import run_sweep, run_tune

    storage = pg_stack.optuna_storage
    with env_vars(pg_stack.env()):
        res = run_sweep(_small_sweep(tmp_path, "pgsweep", epochs=1), storage=storage, workers=2, progress=False)
        tres = run_tune(_tune_file(tmp_path, "pgtune", 2, epochs=1), storage=storage, progress=False)
    with env_vars(pg_stack.env()):
        import mlflow

        c = mlflow.MlflowClient()
        exp = c.get_experiment_by_name("pgsweep")
        runs = c.search_runs([exp.experiment_id])
    kids = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == res.parent_run_id]
    assert sorted(k.data.tags["sweep_config"] for k in kids) == ["a", "b"]
    assert all(k.info.status == "FINISHED" for k in kids)
    with env_vars(pg_stack.env()):
        _check_tune(tres, pg_stack.server.url, "pgtune", 2)
    conn = psycopg2.connect(host="127.0.0.1", port=pg_stack.pg.port, dbname="optuna", user="optuna",
                            password=pg_stack.optuna_db_password)
    with conn, conn.cursor() as cur:
        cur.execute("select s.study_name, count(t.trial_id) from studies s join trials t using (study_id) "
                    "group by s.study_name")
        counts = dict(cur.fetchall())
    conn.close()
    assert counts[res.study_name] == 2 and counts[tres.study_name] == 2


# ------------------------------------------------------------------------------------------------ parent run, queue

def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens on it once closed


def test_a_failed_parent_creation_leaves_the_next_launch_free(tmp_path, cushing_home):
    """The first launch cannot reach the tracking server: nothing is recorded as the parent, the storage's lock is
    released with the process, and the next launch, with a good tracking URI, creates the parent."""
    from cushing.tracking import TrackingUnavailable
    from cushing.workflows.sweeps import open_sweep

    study = _small_sweep(tmp_path, "parentfail")
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    with env_vars({"MLFLOW_TRACKING_URI": f"http://127.0.0.1:{_closed_port()}", "CUSHING_TRACKING_CONNECT_S": "1"}):
        with pytest.raises(TrackingUnavailable):
            open_sweep(study, storage=storage)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with env_vars({"MLFLOW_TRACKING_URI": uri}):
        h = open_sweep(study, storage=storage)
        h.grid.close()
    parents, _, _ = _children(uri, "parentfail")
    assert [p.info.run_id for p in parents] == [h.parent_run_id]
    assert sorted(t.user_attrs["label"] for t in h.grid.ostudy.get_trials(deepcopy=False)) == ["a", "b"], \
        "the grid was queued once, by the launch that could open it"


def _queued(study_path: Path, storage: str, uri: str):
    """The open sweep and its trials: what workers take from Optuna's queue."""
    from cushing.workflows.sweeps import open_sweep

    with env_vars({"MLFLOW_TRACKING_URI": uri}):
        h = open_sweep(study_path, storage=storage)
    return h


def test_stops_do_not_count_against_the_retry_limit_and_deaths_do(tmp_path, cushing_home):
    """Configuration a was stopped (Ctrl-C) MAX_RETRY + 1 times: it is queued again each time. b's workers died
    MAX_RETRY + 1 times (Optuna's stale check with RetryHeartbeatStaleTrialCallback): it is failed for good."""
    from optuna.trial import TrialState

    from cushing.workflows.sweeps import MAX_RETRY, run_sweep, sweep_status
    from cushing.workflows.sweeps.worker import _tend

    study = _small_sweep(tmp_path, "stops", epochs=1)
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with env_vars({"MLFLOW_TRACKING_URI": uri, "CUSHING_HEARTBEAT_S": "1", "CUSHING_GRACE_S": "1"}):
        h = _queued(study, storage, uri)
        try:
            for _ in range(MAX_RETRY + 1):
                for trial in (h.grid.ostudy.ask(), h.grid.ostudy.ask()):
                    if trial.user_attrs["label"] == "a":  # stopped: failed as interrupted
                        trial.set_user_attr("interrupted", "KeyboardInterrupt: ")
                        h.grid.ostudy.tell(trial, state=TrialState.FAIL)
                    else:  # died: it beat once, then stopped beating
                        h.grid.storage.record_heartbeat(h.grid.storage.get_trial_id_from_study_id_trial_number(
                            h.grid.storage.get_study_id_from_name(h.grid.name), trial.number))
                time.sleep(2.5)
                _tend(h.grid)
            status = sweep_status(h)
            assert status["failed"] == ["b"] and not status["finished"], status
        finally:
            h.grid.close()
        res = run_sweep(study, storage=storage, workers=1, progress=False)
    assert res.trained == 1
    _, kids, _ = _children(uri, "stops")
    assert [k.data.tags["sweep_config"] for k in kids if k.info.status == "FINISHED"] == ["a"]


def test_a_trial_asked_after_the_queue_emptied_is_failed_not_trained(tmp_path, cushing_home, monkeypatch):
    """Two workers ask for the last queued configuration at once: Optuna gives the slower one a new trial that no
    configuration is queued for; it is failed at once (`queue_empty`), never trained."""
    from optuna.trial import TrialState

    from cushing.workflows.sweeps.worker import _ask

    study = _small_sweep(tmp_path, "race", epochs=1)
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    h = _queued(study, storage, f"sqlite:///{tmp_path / 'mlflow.db'}")
    try:
        first = h.grid.ostudy.ask()  # one of the two queued configurations is taken; one is left
        real_ask = h.grid.ostudy.ask

        def racing_ask(*args, **kwargs):
            real_ask()  # another worker takes the last queued configuration between the check and the ask
            return real_ask(*args, **kwargs)
        monkeypatch.setattr(h.grid.ostudy, "ask", racing_ask)
        assert _ask(h.grid) is None, "nothing queued for it: nothing to train"
        trials = h.grid.ostudy.get_trials(deepcopy=False)
    finally:
        h.grid.close()
    labelled = sorted(t.user_attrs["label"] for t in trials if "label" in t.user_attrs)
    assert labelled == ["a", "b"] and first.user_attrs["label"] in labelled
    (extra,) = [t for t in trials if "label" not in t.user_attrs]
    assert extra.state == TrialState.FAIL and "queue_empty" in extra.user_attrs


# ------------------------------------------------------------------------------------------------ cohorts, storage

def test_configurations_that_split_differently_do_not_share_a_cohort(cushing_home):
    """The memo's key holds every field the cohort depends on: configurations that differ only in split_strata,
    subgroups or audit get a cohort each; ones that differ only in training options share one."""
    import dataclasses

    from cushing.config import TrainConfig
    from cushing.workflows.sweeps.worker import _CohortMemo

    base = TrainConfig(model="resnet18", pretrained=False, img_size=32, audit="off", bootstrap=0)
    key = _CohortMemo.key
    for change in ({"split_strata": "label"}, {"subgroups": "sex,label"}, {"audit": "warn"}):
        assert key(dataclasses.replace(base, **change)) != key(base), change
    assert key(dataclasses.replace(base, lr=0.1, batch_size=8, epochs=3, seed=4, model="resnet34")) == key(base)
    memo = _CohortMemo()
    a, b = memo.get(base), memo.get(dataclasses.replace(base, split_strata="label"))
    assert len(memo.memo) == 2 and a is not b
    assert memo.get(dataclasses.replace(base, lr=0.5)) is a and len(memo.memo) == 2


def test_the_cohort_key_covers_every_field_prepare_cohort_reads():
    """A field read by prepare_cohort (or its audit step) but missing from COHORT_FIELDS would let configurations
    that differ in it share the first one's cohort."""
    import inspect
    import re

    from cushing.model import train
    from cushing.config import COHORT_FIELDS

    source = inspect.getsource(train.prepare_cohort) + inspect.getsource(train._audit)
    read = set(re.findall(r"\bcfg\.(\w+)", source))
    assert read, "prepare_cohort reads its configuration as `cfg`"
    properties = {"ratios": "split_ratios", "subgroup_columns": "subgroups", "strata_columns": "split_strata"}
    execution = {"decode_workers"}  # how fast images decode, not what they are
    fields = {properties.get(f, f) for f in read} - execution - {"model"}  # model: its interpolation is in the key
    assert fields <= set(COHORT_FIELDS), fields - set(COHORT_FIELDS)


def test_reading_a_missing_storage_creates_nothing(tmp_path, capsys):
    from cushing.cli import main
    from cushing.workflows.sweeps import StorageMissing, report_sweep, resolve_scope

    missing = tmp_path / "nowhere" / "optuna.db"
    study = _small_sweep(tmp_path, "unlaunched")
    with pytest.raises(StorageMissing, match="no Optuna storage at"):
        report_sweep(study, f"sqlite:///{missing}")
    scope = resolve_scope(project=str(study), storage=f"sqlite:///{missing}")
    assert scope.parent_run_id is None and "not launched yet" in scope.how
    rc = main(["sweep", str(study), "--report", "--storage", f"sqlite:///{missing}"])
    assert rc == 2 and "no Optuna storage at" in capsys.readouterr().err
    assert not missing.parent.exists(), "nothing was created to read"
