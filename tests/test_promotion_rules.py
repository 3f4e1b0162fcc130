"""When the best eligible run replaces the champion: the comparison rules, on registry entities as MLflow returns
them (the end-to-end promotion against a real server is in test_server.py)."""
from __future__ import annotations

import math
import subprocess
import sys

import pandas as pd
import pytest
from mlflow.entities.model_registry import ModelVersion, ModelVersionTag

from cushing.config import ConfigError
from cushing.release.registry import PromotionPolicy, _against_champion


def _version(version: str, **tags) -> ModelVersion:
    base = {"source_run": "r0", "synthetic_data": "false", "data_digest": "a" * 64, "selection_metric": "val/f1",
            "selection_value": "0.700000"}
    return ModelVersion("cushing", version, creation_timestamp=0,
                        tags=[ModelVersionTag(k, v) for k, v in {**base, **tags}.items()])


def _best(value: float, **kw) -> pd.Series:
    return pd.Series({"val/f1": value, "val/brier": value, "synthetic_data": False, "data_digest": "a" * 64, **kw})


def test_same_cohort_same_metric_compares_scores():
    assert _against_champion(None, _best(0.71), PromotionPolicy(), _version("1")).better
    assert not _against_champion(None, _best(0.69), PromotionPolicy(), _version("1")).better


def test_a_synthetic_champion_gives_way_to_any_real_winner():
    champion = _version("1", synthetic_data="true", data_digest="d" * 64, selection_value="0.990000")
    v = _against_champion(None, _best(0.30), PromotionPolicy(), champion)
    assert v.better and "SYNTHETIC" in v.note
    assert not _against_champion(None, _best(0.30, synthetic_data=True), PromotionPolicy(), champion).better


def test_scores_on_another_cohort_are_not_compared():
    v = _against_champion(None, _best(0.95, data_digest="b" * 64), PromotionPolicy(), _version("1"))
    assert not v.better and "another cohort" in v.note and "set_registered_model_alias" in v.note


def test_a_champion_chosen_on_another_metric_is_compared_on_this_one(tmp_path, monkeypatch):
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'm.db'}")
    c = mlflow.MlflowClient()
    run = c.create_run(c.create_experiment("x"))
    c.log_metric(run.info.run_id, "val/brier", 0.10)
    champion = _version("1", source_run=run.info.run_id)  # chosen on val/f1
    policy = PromotionPolicy(metric="val/brier")
    worse, better = _against_champion(c, _best(0.20), policy, champion), _against_champion(c, _best(0.05), policy,
                                                                                           champion)
    assert worse.value == 0.10 and not worse.better and better.better  # brier: lower is better
    gone = _against_champion(c, _best(0.20), policy, _version("1", source_run="missing"))
    assert math.isnan(gone.value) and gone.better


@pytest.mark.parametrize("kw,needle", [
    ({"metric": "val/loss"}, "val/loss is logged per epoch only"),
    ({"metric": "val/auc", "max_sex_gap": 0.1}, "a gap gate (max_sex_gap) needs a metric with gaps"),
    ({"metric": "val/brier", "max_subgroup_gap": 0.1}, "a gap gate (max_subgroup_gap) needs a metric with gaps"),
    ({"metric": "test/f1"}, "validation metrics only")])
def test_a_policy_that_could_rank_or_gate_nothing_is_refused(kw, needle):
    """A metric finished runs do not log, or a gap gate on a metric without gaps, would exclude every run for a
    made-up reason ('not estimable'): refused up front, in one line from the command line."""
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        PromotionPolicy(**kw)
    args = [f"--{k.replace('_', '-')}={v}" for k, v in kw.items()]
    r = subprocess.run([sys.executable, "-m", "cushing", "promote", *args], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and needle in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]
