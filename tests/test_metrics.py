"""One metric vocabulary: point metrics against scikit-learn, NaN where undefined, per-sex from one table."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from sklearn import metrics as skm

from cushing.stats.metrics import METRICS, point_metrics
from cushing.stats.report import per_sex_table, rows_to_metrics, summarize


@pytest.mark.parametrize("seed", range(5))
def test_point_metrics_match_sklearn(seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 200)
    p = np.clip(y * 0.3 + rng.random(200) * 0.7, 0, 1).round(2)  # ties included
    thr = 0.5
    yh = (p >= thr).astype(int)
    m = point_metrics(y, p, thr)
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(y, yh))
    assert m["precision"] == pytest.approx(skm.precision_score(y, yh))
    assert m["recall"] == pytest.approx(skm.recall_score(y, yh))
    assert m["specificity"] == pytest.approx(skm.recall_score(1 - y, 1 - yh))
    assert m["f1"] == pytest.approx(skm.f1_score(y, yh))
    assert m["auc"] == pytest.approx(skm.roc_auc_score(y, p))


def test_undefined_metrics_are_nan_not_zero():
    m = point_metrics(np.zeros(5, int), np.linspace(0.1, 0.9, 5), 0.5)
    assert math.isnan(m["recall"]) and math.isnan(m["f1"]) and math.isnan(m["auc"])
    assert m["specificity"] == pytest.approx(2 / 5)  # 0.5, 0.7, 0.9 predicted positive
    m = point_metrics(np.array([1, 0, 1]), np.array([0.1, 0.2, 0.3]), 0.5)  # nothing predicted positive
    assert math.isnan(m["precision"]) and m["recall"] == 0.0 and m["f1"] == 0.0


def _pred(seed=0, n=120):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    return pd.DataFrame({"subject": [f"s{i}" for i in range(n)], "split": np.where(np.arange(n) < n // 2, "val", "test"),
                         "sex": rng.choice(["F", "M"], n), "label": y,
                         "probability": np.clip(0.35 * y + rng.random(n) * 0.65, 0, 1)})


def test_summarize_names_and_per_sex_values():
    pred = _pred()
    rows = summarize(pred, split="test", threshold=0.5)
    names = {r.name for r in rows}
    for m in METRICS:
        assert {f"test/{m}", f"test/{m}/female", f"test/{m}/male"} <= names
    test_f = pred[(pred["split"] == "test") & (pred["sex"] == "F")]
    got = next(r.value for r in rows if r.name == "test/f1/female")
    assert got == pytest.approx(skm.f1_score(test_f["label"], test_f["probability"] >= 0.5))
    metrics = rows_to_metrics(rows)
    assert "test/recall/ci_low" in metrics and metrics["test/recall/ci_low"] <= metrics["test/recall"]
    assert not any("=" in k for k in metrics)


def test_subgroup_without_positives_is_nan_and_flagged():
    pred = _pred()
    pred.loc[pred["sex"] == "M", "label"] = 0
    rows = summarize(pred, split="test", threshold=0.5)
    male_recall = next(r for r in rows if r.name == "test/recall/male")
    assert math.isnan(male_recall.value) and not male_recall.estimable
    table = per_sex_table(rows)
    assert table.loc[table["group"] == "male", "recall"].item() == "not estimable"


def test_min_positives_gate():
    pred = _pred()
    n_male_pos = int(pred[(pred["split"] == "test") & (pred["sex"] == "M")]["label"].sum())
    rows = summarize(pred, split="test", threshold=0.5, min_positives=n_male_pos + 1)
    gated = {r.metric: r for r in rows if r.group == "male"}
    assert math.isnan(gated["f1"].value) and not gated["f1"].estimable
    assert math.isnan(gated["auc"].value) and math.isnan(gated["recall"].ci_low)
    assert not math.isnan(gated["specificity"].value)  # needs negatives, not positives
    rows = summarize(pred, split="test", threshold=0.5, min_positives=n_male_pos)
    assert not math.isnan(next(r.value for r in rows if r.name == "test/f1/male"))


def test_identifying_columns_are_refused_as_subgroups():
    """Protected health information: subject ids, file names or a value per patient never become subgroups."""
    import pandas as pd
    import pytest

    from cushing.stats.subgroups import SubgroupError, check_subgroup_columns

    t = pd.DataFrame({"subject_id": [f"P{i}" for i in range(20)], "image": [f"p{i}.jpg" for i in range(20)],
                      "mrn": [f"M{i:05d}" for i in range(20)], "site": ["A", "B"] * 10, "label": [0, 1] * 10,
                      "sex": ["F"] * 20})
    check_subgroup_columns(t, ("sex", "site"))
    for col in ("subject_id", "image", "mrn"):
        with pytest.raises(SubgroupError, match="identifies patients|single out patients"):
            check_subgroup_columns(t, (col,))
