"""Sweeps and tuning on Optuna's RDB storage: study-file validation, a 2-worker sweep with no duplicates, resume,
a SIGKILLed worker's configuration retried, tuning with pruning as nested runs, and the same on PostgreSQL."""
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

from cushing.config import ConfigError
from cushing.workflows.studies import load_study
from tests.conftest import ROOT, env_vars

pytestmark = pytest.mark.slow


# ------------------------------------------------------------------------------------------------ study files

def test_shipped_study_files_are_valid():
    paper = load_study(ROOT / "projects" / "paper.yaml")
    assert len(paper.configurations) == 23
    assert len({c.model for c in paper.configurations}) == 20
    unfrozen = [c for c in paper.configurations if c.model.startswith("dinov2") and c.freeze is False]
    assert len(unfrozen) == 3 and all(c.epochs == 200 and c.batch_size == 32 for c in paper.configurations)
    assert len(set(paper.labels)) == 23
    demo = load_study(ROOT / "projects" / "demo.yaml")
    assert len(demo.configurations) == 3 and demo.configurations[0].data == "demo"
    tune = load_study(ROOT / "projects" / "tune_vit.yaml")
    assert {p.name for p in tune.space} >= {"lr", "weight_decay", "batch_size", "oversample", "aug_strength", "freeze"}
    assert tune.objective_metric == "val/f1" and tune.pruner["type"] == "median"


@pytest.mark.parametrize("text,needle", [
    ("name: x\nkind: sweep\nconfigurations:\n  - {model: resnet18, epochz: 3}\n", ":4:"),
    ("name: x\nkind: sweep\nconfigurations:\n  - {model: resnet18}\n  - {model: resnet9000}\n", "resnet9000"),
    ("name: x\nkind: sweep\nbogus: 1\nconfigurations:\n  - {model: resnet18}\n", ":3: unknown key 'bogus'"),
    ("name: x\nkind: tune\nbase: {model: vit_b_32}\nspace:\n  lr: {type: float, low: 0.1, high: 0.01}\n",
     ":5: lr: low (0.1) must be below high (0.01)"),
    ("name: x\nkind: tune\nspace:\n  lr: {type: float, low: 0.0, high: 0.1, log: true}\n", "log range needs low > 0"),
    ("name: x\nkind: tune\nspace:\n  momentum: {type: float, low: 0.5, high: 1.5}\n", "momentum: bound 1.5 is invalid"),
    ("name: x\nkind: tune\nspace:\n  nonsense: {type: int, low: 1, high: 2}\n", ":4: search parameter 'nonsense'"),
    ("name: x\nkind: tune\nobjective: {metric: test/f1}\nspace:\n  lr: {type: float, low: 0.01, high: 0.1}\n",
     "must be a validation metric"),
])
def test_bad_study_files_name_the_line(tmp_path, text, needle):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_study(path)
    assert needle in str(e.value) and str(path) in str(e.value)


def test_compile_override_reaches_every_configuration_without_changing_the_study():
    from cushing.workflows.sweeps import _study_name, load_for

    for name, kind in (("paper.yaml", "sweep"), ("tune_vit.yaml", "tune")):
        plain = load_for(ROOT / "projects" / name, kind)
        compiled = load_for(ROOT / "projects" / name, kind, compile="reduce-overhead")
        assert all(c.compile == "reduce-overhead" for c in compiled.configurations)
        assert compiled.base["compile"] == "reduce-overhead"
        assert compiled.config_for({}).compile == "reduce-overhead"  # tuning trials too
        assert [c.model for c in compiled.configurations] == [c.model for c in plain.configurations]
        assert _study_name(compiled) == _study_name(plain), "how a run executes is not what it trains: same study"
    edited = load_for(ROOT / "projects" / "paper.yaml", "sweep")
    import dataclasses
    other = dataclasses.replace(edited, configurations=(dataclasses.replace(edited.configurations[0], lr=0.5),
                                                        *edited.configurations[1:]))
    assert _study_name(other) != _study_name(edited), "what it trains is"
    with pytest.raises(ValueError, match="tune study; use `cushing tune`"):
        load_for(ROOT / "projects" / "tune_vit.yaml", "sweep")


def test_wall_time_model_shares_the_gpu_and_overlaps_cpu_work():
    from cushing.workflows.plan import GPU_SHARING, Estimate, makespan

    a = Estimate(compile_s=0.0, gpu_s=10.0, overhead_s=5.0)
    assert makespan([a, a], 1) == pytest.approx(30.0)  # one worker: everything in sequence
    # two workers: both train at once at 1.5x the throughput of one, then finish on the CPU side by side
    assert makespan([a, a], 2) == pytest.approx(20.0 / GPU_SHARING[2] + 5.0)
    # a job in its CPU phase leaves the GPU to the other: 10 s alone, then 10 s of the second job's CPU work
    b = Estimate(compile_s=10.0, gpu_s=0.0, overhead_s=0.0)
    assert makespan([a, b], 2) == pytest.approx(15.0)
    assert makespan([], 3) == 0.0


def test_sweep_plan_prints_estimates_for_the_paper_grid(capsys):
    from cushing.cli import main
    from cushing.workflows.sweeps import plan_sweep

    table, wall = plan_sweep(ROOT / "projects" / "paper.yaml", [1, 2, 4])
    assert len(table) == 23
    assert wall[1] == pytest.approx(table["total_s"].sum())  # one worker: the sum of the configurations
    assert wall[4] < wall[2] < wall[1]
    frozen = table[table["configuration"].str.endswith("-frozen")]
    assert len(frozen) == 3 and (frozen["train_s"] < table["train_s"].median()).all()
    ctable, _ = plan_sweep(ROOT / "projects" / "paper.yaml", [1], compile="reduce-overhead")
    tuned = ~table["configuration"].str.endswith("-frozen")
    assert (ctable.loc[tuned, "train_s"] < table.loc[tuned, "train_s"]).all()
    assert (ctable.loc[tuned, "compile_s"] > 0).all() and (ctable.loc[~tuned, "compile_s"] == 0).all()
    assert main(["sweep", str(ROOT / "projects" / "paper.yaml"), "--plan", "--workers", "3"]) == 0
    out = capsys.readouterr().out
    assert "swin_l" in out and "--workers 3:" in out and "H200" in out
    with pytest.raises(SystemExit):
        main(["sweep", str(ROOT / "projects" / "paper.yaml"), "--plan", "--workers", "-2"])
    assert "at least 1 worker" in capsys.readouterr().err


def test_auto_workers_are_two_on_a_gpu_and_one_on_a_cpu():
    import torch

    from cushing.cli import build_parser
    from cushing.workflows.sweeps import auto_workers

    assert auto_workers() == (2 if torch.cuda.is_available() else 1)
    ns = build_parser().parse_args(["sweep", "projects/paper.yaml", "--workers", "auto"])
    assert ns.workers is None  # resolved by run_sweep with auto_workers()
    assert build_parser().parse_args(["sweep", "projects/paper.yaml", "--workers", "3"]).workers == 3


# ------------------------------------------------------------------------------------------------ sweep

def _children(uri: str, experiment: str):
    import mlflow

    with env_vars({"MLFLOW_TRACKING_URI": uri}):
        c = mlflow.MlflowClient()
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
    assert orphan.info.status == "FAILED" and "worker_died" in orphan.data.tags


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
