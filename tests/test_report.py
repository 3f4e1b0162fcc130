"""The report of a predictions table: names, intervals, subgroup gaps, counts and the one not-estimable tag."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from cushing.stats.metrics import point_metrics
from cushing.stats.report import build_report


def _pred(seed: int = 0, n: int = 360) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.3).astype(int)
    sex = rng.choice(["F", "M"], n, p=[0.55, 0.45])
    site = np.where(np.arange(n) % 3 == 0, "A", np.where(np.arange(n) % 3 == 1, "B", "C"))
    y[site == "C"] = 0
    y[np.flatnonzero(site == "C")[[5, 70]]] = 1  # site C: one patient in each split
    return pd.DataFrame({"subject": [f"s{i}" for i in range(n)], "split": np.where(np.arange(n) < n // 2, "val",
                         "test"), "sex": sex, "site": site, "label": y,
                         "probability": np.clip(0.3 * y + 0.7 * rng.random(n), 0, 1)})


def test_report_names_overall_per_sex_and_per_subgroup():
    pred = _pred()
    r = build_report(pred, threshold=0.5, bootstrap=200, subgroup_columns=("sex", "site"), min_positives=5)
    m = r.metrics
    test = pred[pred["split"] == "test"]
    a = test[test["site"] == "A"]
    assert m["test/f1/site:A"] == pytest.approx(point_metrics(a["label"], a["probability"], 0.5)["f1"])
    assert m["test/n/site:A"] == len(a) and m["test/positives/site:A"] == a["label"].sum()
    assert m["test/recall/site:A/ci_low"] <= m["test/recall/site:A"] <= m["test/recall/site:A/ci_high"]
    assert "test/f1/female" in m and "test/f1/sex_gap" in m and "test/f1/sex_gap/ci_low" in m
    c = test[test["site"] == "C"]
    assert c["label"].sum() < 5 and math.isnan(m["test/f1/site:C"])
    estimable = [v for k, v in m.items() if k.startswith("test/f1/site:") and k.count("/") == 2 and math.isfinite(v)]
    assert m["test/f1/gap:site"] == pytest.approx(max(estimable) - min(estimable))
    assert "test/site:C: precision, recall, f1, auc" in r.tags["not_estimable"]
    assert set(r.per_subgroup["column"]) == {"all", "sex", "site"} and "site" not in r.per_sex.columns
    assert not any("=" in k for k in m)


def test_sex_gap_is_female_minus_male_and_gated():
    pred = _pred(1)
    r = build_report(pred, threshold=0.5, bootstrap=0, min_positives=1)
    assert r.metrics["test/recall/sex_gap"] == pytest.approx(r.metrics["test/recall/female"]
                                                             - r.metrics["test/recall/male"])
    gated = build_report(pred, threshold=0.5, bootstrap=0, min_positives=10_000)
    assert math.isnan(gated.metrics["test/f1/sex_gap"]) and math.isfinite(gated.metrics["test/specificity/sex_gap"])
    assert "test/f1/sex_gap: a sex has fewer than min_positives=10000 patients" in gated.tags["not_estimable"]


def test_min_positives_counts_patients_not_photos():
    """One male patient with six photos in each split is one patient: male recall, F1, AUC and the sex gap of F1 are
    not estimable at min_positives=5, and the counts say both numbers."""
    pred = _pred(3)
    male = pred["sex"] == "M"
    pred.loc[male, "label"] = 0
    for split in ("val", "test"):
        six = pred.index[male & (pred["split"] == split)][:6]
        pred.loc[six, ["label", "subject"]] = [1, f"patient-{split}"]
    r = build_report(pred, threshold=0.5, bootstrap=200, min_positives=5)
    m = r.metrics
    assert (m["test/positives/male"], m["test/patients/male"]) == (6, 1)
    assert m["test/patients/female"] == pred.loc[~male & (pred["split"] == "test"), "label"].sum() >= 5
    for name in ("test/recall/male", "test/f1/male", "test/auc/male", "test/f1/sex_gap"):
        assert math.isnan(m[name]) and f"{name}/ci_low" not in m, name
    assert "test/male: precision, recall, f1, auc (1 patients < min_positives=5)" in r.tags["not_estimable"]
    assert (r.per_sex.set_index(["split", "group"]).loc[("test", "male"), ["positives", "patients"]] == [6, 1]).all()


def test_argmax_rows_and_prevalence():
    pred = _pred(2)
    r = build_report(pred, threshold=0.4, bootstrap=0, prevalence=0.01)
    test = pred[pred["split"] == "test"]
    assert r.metrics["test_argmax/recall"] == pytest.approx(point_metrics(test["label"], test["probability"],
                                                                          0.5)["recall"])
    assert r.metrics["prevalence"] == 0.01 and 0 <= r.metrics["test/ppv"] <= 1 and r.metrics["threshold"] == 0.4
    assert "test_argmax/n" not in r.metrics, "counts once per split, not again for argmax"


def test_unsafe_column_names_and_many_small_sites_still_log(tmp_path):
    """A column named as people name them ('age band (y)') and 40 small sites: every metric and the not-estimable
    tag are accepted by a real MLflow store, the tag within MLflow's limit, saying how much it left out."""
    import mlflow
    from mlflow.entities import Metric, RunTag

    from cushing.tracking.stores import seed_sqlite

    pred = _pred(3, n=1200).rename(columns={"site": "age band (y)"})
    pred["centre"] = [f"site {i % 40}" for i in range(len(pred))]
    r = build_report(pred, threshold=0.5, bootstrap=0, subgroup_columns=("sex", "age band (y)", "centre"),
                     min_positives=5)
    seed_sqlite(uri := f"sqlite:///{tmp_path / 'mlflow.db'}")
    client = mlflow.MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("report", str(tmp_path / "a"))).info.run_id
    metrics = [Metric(k, v, 0, 0) for k, v in r.metrics.items()]
    for i in range(0, len(metrics), 900):  # log_batch takes at most 1000 metrics per call
        client.log_batch(run_id, metrics=metrics[i:i + 900])
    tag = r.tags["not_estimable"]
    client.log_batch(run_id, tags=[RunTag("not_estimable", tag)])
    logged = client.get_run(run_id).data
    assert set(logged.metrics) == set(r.metrics) and "test/f1/gap:age band _y_" in logged.metrics
    assert logged.tags["not_estimable"] == tag
    assert len(tag) <= 5000 and tag.endswith("more (per_subgroup.csv has every row)")
