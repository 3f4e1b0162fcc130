"""Every MLproject entry point as a user runs it: `mlflow run . --env-manager local -e NAME` with its required
parameters and `''` for optional strings. Each logs into the run `mlflow run` created (MLflow's multistep
convention), never into a second one, and utility runs sit under the sweep they worked on."""
from __future__ import annotations

import os

import pandas as pd
import pytest
import yaml

from tests.conftest import ROOT, env_vars, mlflow_run

pytestmark = pytest.mark.slow


def _client(uri: str):
    import mlflow

    mlflow.set_tracking_uri(uri)
    return mlflow.MlflowClient()


def _runs(uri: str, experiment: str) -> list:
    c = _client(uri)
    exp = c.get_experiment_by_name(experiment)
    return c.search_runs([exp.experiment_id], max_results=1000)


def test_every_entry_point_is_declared_with_a_test_here():
    """A new entry point must be exercised by `mlflow run` in this file (or the end-to-end main test, or, for the
    pipeline, tests/test_pipeline.py: its rerun under `mlflow run` reuses the steps of a pipeline run before)."""
    declared = set(yaml.safe_load((ROOT / "MLproject").read_text())["entry_points"])
    tested_here = {"sweep", "promote", "dashboard", "evaluate", "faces", "tune", "audit"}
    elsewhere = {"main", "pipeline"}
    assert declared == tested_here | elsewhere, declared ^ (tested_here | elsewhere)


def test_sweep_run_becomes_the_parent_of_its_configurations(demo_sweep):
    runs = _runs(demo_sweep["uri"], "cushing-demo")
    parent = next(r for r in runs if r.info.run_id == demo_sweep["runs"]["sweep"])
    assert parent.data.tags["task"] == "sweep" and parent.data.tags["mlflow.runName"] == "sweep-demo"
    kids = [r for r in runs if r.data.tags.get("sweep_config")]
    assert len(kids) == 3 and all(k.data.tags["mlflow.parentRunId"] == parent.info.run_id for k in kids)
    # the parent shows numbers in the chart and compare views without expanding the sweep
    assert {"best/val/f1", "best/test/f1", "sweep/configurations_done"} <= set(parent.data.metrics)
    assert parent.data.metrics["sweep/configurations_done"] == 3
    out = demo_sweep["stdout"]
    assert all(f"configuration {i}/3" in out for i in (1, 2, 3)) and "3/3 done" in out


def test_utility_runs_log_into_their_own_run_nested_under_the_sweep(demo_sweep):
    c = _client(demo_sweep["uri"])
    ids = demo_sweep["runs"]
    promote, again, dash = (c.get_run(ids[k]) for k in ("promote", "promote_again", "dashboard"))
    for r in (promote, again, dash):
        assert r.info.status == "FINISHED"
        assert r.data.tags["mlflow.parentRunId"] == ids["sweep"], "nested under the sweep it ranked or showed"
    assert promote.data.tags["mlflow.runName"] == "promote" and promote.data.tags["changed"] == "true"
    assert "ranking.csv" in {a.path for a in c.list_artifacts(promote.info.run_id)}
    # nothing to change: the run mlflow created is still named and says so, instead of an empty random run
    assert again.data.tags["mlflow.runName"] == "promote" and again.data.tags["changed"] == "false"
    assert again.data.tags["decision"].startswith("no change")
    assert dash.data.tags["mlflow.runName"] == "dashboard"
    assert "dashboard.html" in {a.path for a in c.list_artifacts(dash.info.run_id)}
    top = [r for r in _runs(demo_sweep["uri"], "cushing-demo") if "mlflow.parentRunId" not in r.data.tags]
    assert [r.info.run_id for r in top] == [ids["sweep"]], "the sweep is the only top-level run"


def test_promote_found_the_study_experiment_and_registered_with_provenance(demo_sweep):
    c = _client(demo_sweep["uri"])
    assert "study demo.yaml" in demo_sweep["promote_stdout"] and "'cushing-demo'" in demo_sweep["promote_stdout"]
    champion = c.get_model_version_by_alias("cushing", "champion")
    assert champion.tags["synthetic_data"] == "true" and len(champion.tags["data_digest"]) == 64
    # the study's `promote: metric: val/auc`, not an entry-point default that would override it
    assert champion.tags["selection_metric"] == "val/auc"
    assert "SYNTHETIC" in champion.description
    assert c.get_model_version_by_alias("cushing", "challenger").version == champion.version


@pytest.fixture(scope="module")
def tiny_tune(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("tune-file") / "tiny_tune.yaml"
    path.write_text(yaml.safe_dump({
        "name": "tiny", "kind": "tune", "experiment": "cushing-demo",
        "base": {"data": "demo", "model": "resnet18", "pretrained": False, "epochs": 1, "img_size": 32,
                 "bootstrap": 0, "cam": False, "log_model": False},
        "n_trials": 1, "space": {"lr": {"type": "float", "low": 1e-3, "high": 1e-2, "log": True}}}))
    return str(path)


def test_tune_entry_point(demo_sweep, tiny_tune):
    run_id, r = mlflow_run(demo_sweep["dir"], demo_sweep["env"], "tune", f"project={tiny_tune}", "n_trials=1",
                           "storage=", "compile=", experiment="cushing-demo")
    c = _client(demo_sweep["uri"])
    parent = c.get_run(run_id)
    assert parent.data.tags["task"] == "tune" and "best/val/f1" in parent.data.metrics
    kids = [k for k in _runs(demo_sweep["uri"], "cushing-demo") if k.data.tags.get("mlflow.parentRunId") == run_id]
    assert len(kids) == 1 and kids[0].data.tags["tune"] == "tiny"
    assert "trial 1/1" in r.stdout


def test_evaluate_entry_point(demo_sweep, demo_manifest, tmp_path):
    subset = pd.read_csv(demo_manifest).groupby("label").head(6)
    subset["image"] = [str(demo_manifest.parent / p) for p in subset["image"]]
    subset.drop(columns=["split"], errors="ignore").to_csv(tmp_path / "external.csv", index=False)
    run_id, _ = mlflow_run(demo_sweep["dir"], demo_sweep["env"], "evaluate", f"manifest={tmp_path / 'external.csv'}",
                           "prevalence=", "bootstrap=50", experiment="cushing-demo")
    run = _client(demo_sweep["uri"]).get_run(run_id)
    assert run.data.tags["task"] == "external_validation" and run.data.tags["source_model_uri"].endswith("@champion")
    assert run.data.metrics["external/n"] == 12 and "external/auc" in run.data.metrics


def test_faces_entry_point(tmp_path, celeba_manifest):
    photos = celeba_manifest.head(6)
    photos.to_csv(tmp_path / "photos.csv", index=False)
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    env.pop("MLFLOW_RUN_ID", None)
    run_id, _ = mlflow_run(tmp_path, env, "faces", f"manifest={tmp_path / 'photos.csv'}", f"out={tmp_path / 'faces'}",
                           "sam_checkpoint=", "sam_model_type=", "cache_dir=", "skip_bad_photos=true",
                           experiment="cushing")
    with env_vars({"MLFLOW_TRACKING_URI": env["MLFLOW_TRACKING_URI"]}):
        run = _client(env["MLFLOW_TRACKING_URI"]).get_run(run_id)
        assert run.info.status == "FINISHED" and run.data.tags["task"] == "faces"
        assert run.data.params["sam_checkpoint"] == "''" and run.data.metrics["faces/photos"] == 6
        m = run.data.metrics  # a photo without a face dlib finds is left out, and counted, only when told
        assert m["skipped_photos"] == 6 - m["faces/extracted"] == m["skipped_photos/female"] + m["skipped_photos/male"]
        assert len(_runs(env["MLFLOW_TRACKING_URI"], "cushing")) == 1, "no second run"
    assert (tmp_path / "faces" / "manifest.csv").exists()


def test_audit_entry_point(tmp_path, celeba_manifest):
    photos = celeba_manifest.head(8)
    photos.to_csv(tmp_path / "photos.csv", index=False)
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    env.pop("MLFLOW_RUN_ID", None)
    run_id, r = mlflow_run(tmp_path, env, "audit", f"manifest={tmp_path / 'photos.csv'}", f"out={tmp_path / 'audit'}",
                           experiment="cushing")
    run = _client(env["MLFLOW_TRACKING_URI"]).get_run(run_id)
    assert run.data.tags["task"] == "audit" and run.data.metrics["audit/photos"] == 8
    assert "audit.csv" in {a.path for a in _client(env["MLFLOW_TRACKING_URI"]).list_artifacts(run_id)}
    assert (tmp_path / "audit" / "audit.csv").exists() and "photos/s" in r.stdout
