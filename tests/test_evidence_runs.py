"""Cross-validation, repeated seeds, paired comparison and external validation, end to end through MLflow."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from cushing.config import ConfigError, TrainConfig
from cushing.stats.calibration import brier, ece

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def store(tmp_path_factory, cushing_home):
    import os

    import mlflow

    d = tmp_path_factory.mktemp("evidence-store")
    uri = f"sqlite:///{d / 'mlflow.db'}"
    old = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = uri
    os.environ.pop("MLFLOW_RUN_ID", None)
    mlflow.set_tracking_uri(uri)
    yield uri
    if old is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = old


def _cfg(small_demo, **kw):
    return TrainConfig(**{**dict(data=str(small_demo), model="resnet18", pretrained=False, epochs=1, img_size=48,
                                 bootstrap=200, cam=False, experiment="evidence"), **kw})


@pytest.fixture(scope="module")
def cv(store, small_demo):
    from cushing.workflows.experiment import run_experiment

    return run_experiment(_cfg(small_demo, cv_folds=3, log_model=False), progress=False)


def test_cv_parent_children_and_pooled_metrics(cv, small_demo):
    import mlflow

    c = mlflow.MlflowClient()
    assert len(cv.children) == 3
    kids = [c.get_run(k.run_id) for k in cv.children]
    assert all(k.info.status == "FINISHED" and k.data.tags["mlflow.parentRunId"] == cv.run_id for k in kids)
    assert sorted(k.data.tags["fold"] for k in kids) == ["0", "1", "2"]
    parent = c.get_run(cv.run_id)
    m = parent.data.metrics
    for key in ("oof/f1", "oof/f1/ci_low", "oof/auc", "oof/recall/female", "test/f1/mean", "test/f1/std"):
        assert key in m, key
    assert m["oof/recall/ci_low"] <= m["oof/recall"] <= m["oof/recall/ci_high"]
    oof = pd.read_csv(mlflow.artifacts.download_artifacts(run_id=cv.run_id, artifact_path="oof_predictions.csv"))
    assert len(oof) == 343 and oof["subject"].is_unique, "every subject is held out exactly once"
    # the folds' own probabilities, whose calibration the parent logs (re-centred scores beside them)
    own = pd.concat([k.predictions[k.predictions["split"] == "test"] for k in cv.children]).set_index("subject")
    assert np.allclose(oof.set_index("subject")["probability"], own.loc[oof["subject"], "probability"])
    y, p = oof["label"].to_numpy(), oof["probability"].to_numpy()
    assert m["oof/brier"] == pytest.approx(brier(y, p)) and m["oof/ece"] == pytest.approx(ece(y, p))
    assert sorted(oof["fold"].unique()) == [0, 1, 2]


@pytest.fixture(scope="module")
def seeds(store, small_demo):
    from cushing.workflows.experiment import run_experiment

    return run_experiment(_cfg(small_demo, seeds=2), progress=False)


def test_seeds_report_mean_and_std(seeds):
    import mlflow

    s = seeds
    parent = mlflow.MlflowClient().get_run(s.run_id)
    vals = [k.metrics["val/auc"] for k in s.children]
    assert parent.data.metrics["val/auc/mean"] == pytest.approx(sum(vals) / 2)
    assert parent.data.metrics["val/auc/std"] == pytest.approx(pd.Series(vals).std(ddof=1))
    assert [k.run_name for k in s.children] == ["resnet18-seed0", "resnet18-seed1"]


def test_paired_comparison_and_refusal(seeds, cv):
    from cushing.workflows.jobs import CompareError, compare_runs

    a, b = seeds.children
    res = compare_runs([a.run_id, b.run_id], log_to="")
    row = res.table.iloc[0]
    assert row["n"] == 114 and 0 <= row["delong_p"] <= 1 and 0 <= row["mcnemar_p"] <= 1
    assert row["delong_p_holm"] == pytest.approx(row["delong_p"])  # one comparison: Holm changes nothing
    import mlflow

    assert "comparison.csv" in {a.path for a in mlflow.MlflowClient().list_artifacts(res.run_id)}
    with pytest.raises(CompareError, match="different test subjects"):
        compare_runs([a.run_id, cv.children[0].run_id])


def test_external_validation_of_a_logged_model(seeds, celeba_manifest, small_demo, tmp_path):
    import mlflow

    from cushing.workflows.jobs import run_evaluate

    a = seeds.children[0]
    model_uri = mlflow.MlflowClient().get_run(a.run_id).data.tags["model_uri"]
    df = celeba_manifest.copy()
    df["sex"] = df["subject_id"].map(df.groupby("subject_id")["sex"].agg(lambda s: s.mode()[0]))
    df = df.drop_duplicates("subject_id")
    ext = pd.concat([df[df["label"] == 1].head(20), df[df["label"] == 0].head(40)])
    path = tmp_path / "external.csv"
    ext[["image", "label", "sex", "subject_id"]].to_csv(path, index=False)
    res = run_evaluate(model_uri=model_uri, manifest=str(path), experiment="evidence", bootstrap=200)
    run = mlflow.MlflowClient().get_run(res.run_id)
    m = run.data.metrics
    assert run.data.tags["task"] == "external_validation" and run.data.tags["source_model_uri"] == model_uri
    assert m["threshold"] == pytest.approx(a.metrics["threshold"]), "scored at the model's stored threshold"
    for key in ("external/f1", "external/auc", "external/recall/ci_low", "external/brier", "external/ece"):
        assert key in m
    assert len(res.predictions) == 60 and not math.isnan(m["external/auc"])
    with pytest.raises(ConfigError, match="is the cohort .* was trained on"):  # its training photos are not external
        run_evaluate(model_uri=model_uri, manifest=str(small_demo), experiment="evidence", bootstrap=200)
    names = {x.path for x in mlflow.MlflowClient().list_artifacts(res.run_id)}
    assert {"per_sex.csv", "predictions.csv", "plots"} <= names


def test_external_intervals_count_patients_not_photos(seeds, celeba_manifest, tmp_path):
    """One registered model scored on an external cohort, then on the same photos listed three times per subject
    (the original and two lossless re-encodings): no interval is narrower, the points stay, the tag says how."""
    import mlflow
    from PIL import Image

    from cushing.workflows.jobs import run_evaluate

    c = mlflow.MlflowClient()
    source = seeds.children[0].run_id
    mv = mlflow.register_model(c.get_run(source).data.tags["model_uri"], "cushing-evidence",
                               tags={"source_run": source})  # as promotion registers it (the card reads it)
    model_uri = f"models:/cushing-evidence/{mv.version}"
    df = celeba_manifest.copy()
    df["sex"] = df["subject_id"].map(df.groupby("subject_id")["sex"].agg(lambda s: s.mode()[0]))
    df = df.drop_duplicates("subject_id")
    ext = pd.concat([df[df["label"] == 1].head(20), df[df["label"] == 0].head(40)])[["image", "label", "sex",
                                                                                        "subject_id"]]
    copies = [ext]
    for fmt in ("png", "bmp"):
        again = ext.copy()
        again["image"] = [str(tmp_path / f"{i}.{fmt}") for i in range(len(ext))]
        for src, dst in zip(ext["image"], again["image"]):
            Image.open(src).convert("RGB").save(dst)
        copies.append(again)
    ext.to_csv(tmp_path / "once.csv", index=False)
    pd.concat(copies).to_csv(tmp_path / "thrice.csv", index=False)
    runs = [c.get_run(run_evaluate(model_uri=model_uri, manifest=str(tmp_path / f"{name}.csv"),
                                   experiment="evidence", bootstrap=300, prevalence=0.02).run_id)
            for name in ("once", "thrice")]
    (once, thrice) = [r.data.metrics for r in runs]
    assert [r.data.tags["interval_method"] for r in runs] == ["wilson", "subject_bootstrap"]
    assert thrice["external/n"] == 3 * once["external/n"] == 180
    lows = [k for k in once if k.endswith("/ci_low")]
    assert {"external/recall/ci_low", "external/specificity/ci_low", "external/ppv/ci_low"} <= set(lows)
    for low in lows:
        high = low[:-len("ci_low")] + "ci_high"
        assert thrice[high] - thrice[low] >= once[high] - once[low] - 1e-9, low[:-len("/ci_low")]
    for k in ("external/recall", "external/specificity", "external/auc", "external/net_benefit"):
        assert thrice[k] == pytest.approx(once[k], abs=1e-6), k
    names = {x.path for x in c.list_artifacts(runs[1].info.run_id)}
    assert "decision_curve.csv" in names and "plots/decision_curve.png" in {
        x.path for x in c.list_artifacts(runs[1].info.run_id, "plots")}


def test_explain_on_a_runs_own_cohort_uses_the_split_it_trained_on(store, small_demo, tmp_path):
    """A split drawn with other strata than the default (here by label only): `explain --run-id` on the run's
    test split explains exactly the test subjects the run was scored on (its overlays are named by hashed subject),
    not a split drawn again; `all` explains every photo."""
    import mlflow

    from cushing.workflows.experiment import run_experiment
    from cushing.workflows.jobs import run_explain

    drawn = tmp_path / "manifest.csv"
    pd.read_csv(small_demo).drop(columns="split").to_csv(drawn, index=False)
    run = run_experiment(_cfg(drawn, split_strata="label", bootstrap=50), progress=False)
    c = mlflow.MlflowClient()
    pred = pd.read_csv(c.download_artifacts(run.run_id, "predictions.csv", str(tmp_path)))
    test = pred.loc[pred["split"] == "test", "subject"]
    _, report = run_explain(run_id=run.run_id, split="test", allow_phi=True)
    overlays = [a.path.rsplit("/", 1)[1] for a in c.list_artifacts(run.run_id, "cam/overlays")]
    assert report.metrics["cam/images"] == len(test) == len(overlays)
    assert sorted(o.rsplit("_", 1)[0] for o in overlays) == sorted(test)
    _, everything = run_explain(run_id=run.run_id, split="all")
    assert everything.metrics["cam/images"] == len(pd.read_csv(drawn))
    # the model alone on the cohort it trained on: its training run's split, into a new run
    model_uri = c.get_run(run.run_id).data.tags["model_uri"]
    new_id, by_model = run_explain(model_uri=model_uri, manifest=str(drawn), split="test", allow_phi=True)
    overlays = [a.path.rsplit("/", 1)[1] for a in c.list_artifacts(new_id, "cam/overlays")]
    assert new_id != run.run_id and sorted(o.rsplit("_", 1)[0] for o in overlays) == sorted(test)
    # another cohort is not the run's: refused, the run's own maps kept
    with pytest.raises(ConfigError, match=f"is not the cohort run {run.run_id} trained on"):
        run_explain(run_id=run.run_id, manifest=str(small_demo))
