"""End to end: `mlflow run . --env-manager local` on the demo cohort, checked through the MLflow client."""
from __future__ import annotations

import base64
import os
import subprocess

import numpy as np
import pandas as pd
import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, demo_manifest):
    work = tmp_path_factory.mktemp("mlflow-run")
    uri = f"sqlite:///{work / 'mlflow.db'}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "MLFLOW_EXPERIMENT_NAME": "cushing"}
    env.pop("MLFLOW_RUN_ID", None)
    env.pop("MLFLOW_EXPERIMENT_ID", None)
    cmd = ["mlflow", "run", str(ROOT), "--env-manager", "local", "--experiment-name", "cushing",
           "-P", "model=resnet18", "-P", "pretrained=false", "-P", "epochs=2", "-P", "img_size=64",
           "-P", "bootstrap=200", "-P", "seed=1", "-P", "momentum=.9"]
    r = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    import mlflow

    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name("cushing")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1
    return client, runs[0], uri, r


def test_run_is_finished_with_params_and_tags(finished_run):
    client, run, _, _ = finished_run
    assert run.info.status == "FINISHED"
    p = run.data.params
    assert p["model"] == "resnet18" and p["epochs"] == "2" and p["pretrained"] == "false" and p["lr"] == "0.001"
    for key in ("batch_size", "oversample", "seed", "weights", "img_size", "device", "freeze"):
        assert key in p
    # -P as written, and what it resolved to where that reads differently (docs/reference/run-outputs.md)
    assert (p["momentum"], p["resolved/momentum"]) == (".9", "0.9") and "resolved/lr" not in p
    assert (p["experiment"], p["resolved/experiment"]) == ("''", "cushing")
    t = run.data.tags
    assert t["mlflow.runName"] == "resnet18" and t["model"] == "resnet18" and t["freeze"] == "false"
    assert t["synthetic_data"] == "true" and "SYNTHETIC" in t["data_note"]


def test_the_experiment_mlflow_run_made_is_marked_for_model_development(finished_run):
    """`mlflow run --experiment-name cushing` made the experiment before the project's code ran; the run it took
    marked it as a model-development experiment (the MLflow 3 UI's kind tag)."""
    client, run, _, _ = finished_run
    assert client.get_experiment(run.info.experiment_id).tags["mlflow.experimentKind"] == "custom_model_development"


def test_metric_names_overall_and_per_sex(finished_run):
    client, run, _, _ = finished_run
    m = run.data.metrics
    for split in ("val", "test"):
        for metric in ("accuracy", "precision", "recall", "specificity", "f1", "auc"):
            assert f"{split}/{metric}" in m
            assert f"{split}/{metric}/female" in m and f"{split}/{metric}/male" in m
    assert "test/recall/ci_low" in m and "test/f1/female/ci_high" in m
    assert not any("=" in k for k in m)


def test_one_name_one_meaning_per_epoch_curves_and_final_values(finished_run):
    """Per-epoch series under epoch/ (one point per epoch); final results once, at step 0."""
    client, run, _, _ = finished_run
    rid = run.info.run_id
    for key in ("epoch/train/loss", "epoch/val/loss", "epoch/val/f1", "epoch/val/auc"):
        assert [h.step for h in client.get_metric_history(rid, key)] == [1, 2], key
    for key in ("val/f1", "test/f1", "test/f1/female", "test/auc/ci_low", "threshold", "best_epoch"):
        assert [h.step for h in client.get_metric_history(rid, key)] == [0], key
    assert not any(k.startswith(("train/", "epoch/test")) for k in run.data.metrics)


def test_not_estimable_subgroups_are_explained_by_visible_counts(finished_run):
    client, run, _, _ = finished_run
    m, tags = run.data.metrics, run.data.tags
    # the paper split has 4 male test positives < min_positives=5: male F1 is NaN (hidden by the UI) ...
    assert m["test/positives/male"] == 4 and m["test/n/male"] == 15 and m["test/positives/female"] == 12
    assert m["test/n"] == 114 and m["test/positives"] == 16
    assert m["test/f1/male"] != m["test/f1/male"]
    # ... and one readable tag says why, instead of one tag per metric
    assert "test/male: precision, recall, f1, auc (4 patients < min_positives=5)" in tags["not_estimable"]
    assert not [k for k in tags if k.startswith("not_estimable/")]
    assert not any(k.endswith("/male") and "female" in k for k in m), "searching '/male' finds only male"


def test_logged_model_carries_the_final_results(finished_run):
    import mlflow

    client, run, _, _ = finished_run
    model_id = run.data.tags["model_uri"].split("/")[-1]
    lm = mlflow.get_logged_model(model_id)
    linked = {x.key: x.value for x in lm.metrics}
    for key in ("val/f1", "test/f1", "test/auc", "test/recall", "test/specificity", "threshold"):
        assert linked[key] == pytest.approx(run.data.metrics[key]), key
    assert float(lm.params["operating_threshold"]) == pytest.approx(run.data.metrics["threshold"])
    assert lm.params["synthetic_data"] == "true" and lm.params["threshold_rule"] == "f1"
    assert lm.tags["synthetic_data"] == "true"


def test_artifacts_and_no_file_names(finished_run, demo_manifest):
    client, run, _, _ = finished_run
    names = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "splits.csv", "predictions.csv", "per_sex.csv", "plots"} <= names
    plots = {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
    assert {"plots/roc.png", "plots/confusion.png", "plots/curves.png", "plots/calibration.png"} <= plots
    import mlflow

    d = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="predictions.csv")
    pred = pd.read_csv(d)
    assert list(pred.columns) == ["subject", "split", "sex", "label", "probability", "prediction"]
    assert len(pred) == 114 + 114 and set(pred["split"]) == {"val", "test"}
    stems = set(pd.read_csv(demo_manifest)["subject_id"])
    assert not stems & set(pred["subject"].astype(str)), "subjects are hashed"
    splits = pd.read_csv(mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="splits.csv"))
    assert splits["subjects"].sum() == 343
    per_sex = pd.read_csv(mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="per_sex.csv"))
    assert {"female", "male", "overall"} <= set(per_sex["group"])


def test_dataset_input_logged_with_digest(finished_run):
    client, run, _, _ = finished_run
    inputs = run.inputs.dataset_inputs
    assert len(inputs) == 1
    ds = inputs[0].dataset
    assert ds.name == "demo-cohort" and run.data.tags["data_digest"].startswith(ds.digest)
    assert "images/" not in ds.source and ".jpg" not in ds.profile + ds.schema + ds.source


def test_model_reloads_weights_only_and_scores_a_synthetic_face(finished_run, monkeypatch):
    client, run, uri, _ = finished_run
    monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "false")
    import mlflow

    from cushing.data.demo import synthetic_jpeg_b64

    model_uri = run.data.tags["model_uri"]
    model = mlflow.pyfunc.load_model(model_uri)
    out = model.predict(pd.DataFrame({"image": [synthetic_jpeg_b64(seed=s) for s in range(3)]}))
    assert list(out.columns) == ["probability", "label", "face_status", "operating_point"]
    assert ((out["probability"] >= 0) & (out["probability"] <= 1)).all()
    thr = run.data.metrics["threshold"]
    assert (out["label"] == (out["probability"] >= thr).astype(int)).all()
    assert (out["face_status"] == "not_applied").all()
    # the weights file is safetensors (no pickle anywhere in the model)
    local = mlflow.artifacts.download_artifacts(model_uri)
    files = [f for _, _, fs in os.walk(local) for f in fs]
    assert "weights.safetensors" in files and not any(f.endswith((".pkl", ".pt", ".pth")) for f in files)


def test_model_matches_logged_test_predictions(finished_run, demo_manifest):
    """The logged model reproduces the run's own test probabilities (same preprocessing end to end)."""
    client, run, _, _ = finished_run
    import mlflow

    from cushing.data.manifest import hash_subject, load_manifest

    pred = pd.read_csv(mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="predictions.csv"))
    manifest = load_manifest(demo_manifest)
    m = manifest.table
    m["subject"] = [hash_subject(s, manifest.subject_key) for s in m["subject_id"]]
    sample = pred[pred["split"] == "test"].head(5).merge(m[["subject", "path"]], on="subject")
    assert len(sample) == 5, "predictions.csv subjects are keyed by the cohort's subject_key"
    model = mlflow.pyfunc.load_model(run.data.tags["model_uri"])
    payload = [base64.b64encode(open(p, "rb").read()).decode() for p in sample["path"]]
    out = model.predict(pd.DataFrame({"image": payload}))
    assert np.allclose(out["probability"].to_numpy(), sample["probability"].to_numpy(), atol=2e-3)


def test_cam_aggregates_logged_without_overlays(finished_run):
    client, run, _, _ = finished_run
    names = {a.path for a in client.list_artifacts(run.info.run_id, "cam")}
    assert "cam/mean_all.png" in names and any(n.startswith("cam/mean_true1_") for n in names)
    assert "cam/overlays" not in names
    assert "cam_regions.csv" in {a.path for a in client.list_artifacts(run.info.run_id)}
    assert -1 <= run.data.metrics["cam/randomization_spearman"] <= 1
    assert run.data.tags["cam_overlays"] == "false"


def test_cli_explain_a_registered_or_logged_model(finished_run, demo_manifest, tmp_path):
    client, run, uri, _ = finished_run
    import subprocess
    import sys

    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    env.pop("MLFLOW_RUN_ID", None)
    r = subprocess.run([sys.executable, "-m", "cushing", "explain", "--model", run.data.tags["model_uri"],
                        "--manifest", str(demo_manifest), "--split", "val", "--allow-phi-artifacts", "true"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    new_id = r.stdout.split("logged to run ")[1].split(":")[0]
    new = client.get_run(new_id)
    assert new.data.tags["task"] == "explain" and new.data.metrics["cam/images"] == 114
    overlays = [a.path for a in client.list_artifacts(new_id, "cam/overlays")]
    assert len(overlays) == 114
    stems = set(pd.read_csv(demo_manifest)["subject_id"])
    assert not any(s in o for o in overlays for s in stems), "overlays are named by hashed subject ids"
