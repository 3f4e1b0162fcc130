"""A sweep worker finishes each run (model, tables, plots, Grad-CAM, upload) beside the next configuration's
training: the runs and values are those of finishing in line, a failure while finishing fails that run and the
command loudly, and a stop leaves every run it started in a final state."""
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

from tests.conftest import env_vars

pytestmark = pytest.mark.slow


def _study(tmp_path: Path, name: str, epochs: int = 1, configs: int = 2) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({
        "name": name, "kind": "sweep", "experiment": name,
        "base": {"data": "demo", "pretrained": False, "epochs": epochs, "img_size": 32, "bootstrap": 50,
                 "cam": True, "log_model": True},
        "configurations": [{"model": "resnet18", "label": f"c{i}", "lr": 0.01 * (i + 1)} for i in range(configs)]}))
    return path


def _runs(uri: str, experiment: str):
    from cushing import tracking

    with env_vars({"MLFLOW_TRACKING_URI": uri}):
        c = tracking.client()
        exp = c.get_experiment_by_name(experiment)
        runs = c.search_runs([exp.experiment_id], max_results=100) if exp else []
        kids = {r.data.tags["sweep_config"]: r for r in runs if r.data.tags.get("sweep_config")}
        files = {label: _artifacts(c, r.info.run_id) for label, r in kids.items()}
    return kids, files, runs


def _artifacts(c, run_id: str, path: str | None = None) -> list[str]:
    out = []
    for f in c.list_artifacts(run_id, path):
        out += _artifacts(c, run_id, f.path) if f.is_dir else [f.path]
    return sorted(out)


def _sweep(study: Path, tmp: Path, finisher: bool):
    from cushing.workflows.sweeps import run_sweep

    tmp.mkdir()
    uri, storage = f"sqlite:///{tmp / 'mlflow.db'}", f"sqlite:///{tmp / 'optuna.db'}"
    with env_vars({"MLFLOW_TRACKING_URI": uri, "CUSHING_FINISHER": "1" if finisher else "0"}):
        run_sweep(study, storage=storage, progress=False)
    return uri, storage


def _values(storage: str) -> dict[str, float]:
    import optuna

    s = optuna.load_study(study_name=optuna.get_all_study_names(storage)[0], storage=storage)
    return {t.user_attrs["label"]: t.value for t in s.trials}


def test_runs_finished_beside_training_equal_runs_finished_in_line(tmp_path, cushing_home):
    study = _study(tmp_path, "beside")
    inline_uri, inline_storage = _sweep(study, tmp_path / "inline", finisher=False)
    beside_uri, beside_storage = _sweep(study, tmp_path / "beside", finisher=True)
    inline, inline_files, _ = _runs(inline_uri, "beside")
    beside, beside_files, _ = _runs(beside_uri, "beside")
    assert sorted(beside) == sorted(inline) == ["c0", "c1"]
    timing = ("seconds",)
    for label in inline:
        a, b = inline[label], beside[label]
        assert a.info.status == b.info.status == "FINISHED", label
        ma = {k: v for k, v in a.data.metrics.items() if not any(t in k for t in timing)}
        mb = {k: v for k, v in b.data.metrics.items() if not any(t in k for t in timing)}
        assert ma.keys() == mb.keys() and any(k.startswith("cam") for k in mb), label
        assert ma == pytest.approx(mb, nan_ok=True), label
        assert beside_files[label] == inline_files[label] and "predictions.csv" in beside_files[label], label
        assert "model_uri" in b.data.tags, "the model is logged into the run it belongs to"
    assert _values(beside_storage) == _values(inline_storage), "Optuna is told the same values"
    from cushing import tracking

    with env_vars({"MLFLOW_TRACKING_URI": beside_uri}):
        for label, r in beside.items():
            with tracking.artifact_dir() as d:
                got = pd.read_csv(tracking.download_artifact(r.info.run_id, "predictions.csv", d))
            with env_vars({"MLFLOW_TRACKING_URI": inline_uri}), tracking.artifact_dir() as d:
                want = pd.read_csv(tracking.download_artifact(inline[label].info.run_id, "predictions.csv", d))
            pd.testing.assert_frame_equal(got, want)


def test_a_failure_while_finishing_fails_that_run_and_the_command(tmp_path, cushing_home, monkeypatch):
    from optuna.trial import TrialState

    from cushing.model import explain
    from cushing.workflows.finisher import FinishError

    def broken(*a, **k):
        raise RuntimeError("Grad-CAM broke")
    monkeypatch.setattr(explain, "explain_outcome", broken)
    study = _study(tmp_path, "broken")
    with pytest.raises(FinishError) as e:
        _sweep(study, tmp_path / "s", finisher=True)
    uri, storage = f"sqlite:///{tmp_path / 's' / 'mlflow.db'}", f"sqlite:///{tmp_path / 's' / 'optuna.db'}"
    kids, files, runs = _runs(uri, "broken")
    assert e.value.run_id in {r.info.run_id for r in kids.values()} and "Grad-CAM broke" in str(e.value)
    assert not [r for r in runs if r.info.status == "RUNNING"], "no run left RUNNING"
    failed = kids[next(k for k, r in kids.items() if r.info.run_id == e.value.run_id)]
    assert failed.info.status == "FAILED"
    assert "Grad-CAM broke" in failed.data.tags["cushing.finish_error"]
    label = failed.data.tags["sweep_config"]
    assert "predictions.csv" in files[label], "what was made before the failure is kept"
    import optuna

    trials = optuna.load_study(study_name=optuna.get_all_study_names(storage)[0], storage=storage).trials
    mine = next(t for t in trials if t.user_attrs.get("mlflow_run_id") == e.value.run_id)
    assert mine.state == TrialState.FAIL and "Grad-CAM broke" in mine.user_attrs["error"]


def test_sigterm_during_a_sweep_ends_every_run_and_finishes_the_handed_over_one(tmp_path, cushing_home):
    study = _study(tmp_path, "stopped", epochs=6, configs=3)
    uri, storage = f"sqlite:///{tmp_path / 'mlflow.db'}", f"sqlite:///{tmp_path / 'optuna.db'}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}  # the finisher's grace (20 s) inside the launcher's (30 s)
    env.pop("MLFLOW_RUN_ID", None)
    proc = subprocess.Popen([sys.executable, "-m", "cushing", "sweep", str(study), "--storage", storage],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    deadline, second = time.time() + 400, None
    while time.time() < deadline and second is None:
        time.sleep(0.5)
        try:
            kids, _, _ = _runs(uri, "stopped")
        except Exception:  # the store does not exist yet
            continue
        second = kids.get("c1")  # c0 was scored and handed over: the finisher holds it (or has ended it)
        if second is not None and "epoch/train/loss" not in second.data.metrics:
            second = None  # the stop lands in c1's training, as a scheduler's usually does
    assert second is not None, "the sweep never reached its second configuration's training"
    os.killpg(proc.pid, signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 143, out[-3000:]
    kids, files, runs = _runs(uri, "stopped")
    assert not [r for r in runs if r.info.status == "RUNNING"], "no run left RUNNING"
    assert kids["c0"].info.status == "FINISHED" and "predictions.csv" in files["c0"], "drained within the grace"
    assert kids["c1"].info.status in ("KILLED", "FINISHED")
    assert "c2" not in kids or kids["c2"].info.status in ("KILLED", "FINISHED")
