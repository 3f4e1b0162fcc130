"""What a clinical reviewer asks for (issue 29): intervals that count patients, a decision curve checked against
dcurves, thresholds with a guarantee, and `cushing size` checked against Buderer's formula and statsmodels."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from cushing.stats import intervals, size, thresholds
from cushing.stats.decision import THRESHOLDS, decision_curve
from cushing.stats.report import build_report

Z = stats.norm.ppf(0.975)


def _table(n_pos: int, n_neg: int, seed: int = 0, copies: int = 1, split: str = "test") -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    y = np.r_[np.ones(n_pos, int), np.zeros(n_neg, int)]
    p = np.clip(np.r_[rng.normal(0.55, 0.2, n_pos), rng.normal(0.25, 0.15, n_neg)], 0.001, 0.999)
    one = pd.DataFrame({"subject": [f"s{i}" for i in range(len(y))], "split": split,
                        "sex": rng.choice(["F", "M"], len(y)), "label": y, "probability": p})
    return pd.concat([one] * copies, ignore_index=True)


def _widths(m: dict[str, float]) -> dict[str, float]:
    return {k[:-len("/ci_low")]: m[k[:-len("ci_low")] + "ci_high"] - m[k] for k in m if k.endswith("/ci_low")}


# ------------------------------------------------------------------------------------------------ subjects

def test_three_photos_per_subject_never_narrow_an_interval():
    """The same photos listed three times under one subject id: Wilson would narrow a recall interval by about
    1/sqrt(3); counting subjects, no interval gets narrower, the points do not move, the tag says how."""
    one = _table(30, 120, seed=1)
    three = _table(30, 120, seed=1, copies=3)
    a = build_report(one, threshold=0.4, splits=("test",), bootstrap=500, prevalence=0.02, argmax_split=None)
    b = build_report(three, threshold=0.4, splits=("test",), bootstrap=500, prevalence=0.02, argmax_split=None)
    assert a.tags["interval_method"] == "wilson" and b.tags["interval_method"] == "subject_bootstrap"
    wa, wb = _widths(a.metrics), _widths(b.metrics)
    assert set(wa) == set(wb) and {"test/recall", "test/specificity", "test/ppv", "test/npv"} <= set(wa)
    narrower = {k: (wa[k], wb[k]) for k in wa if wb[k] < wa[k] - 1e-9}
    assert not narrower, narrower
    for k in ("test/recall", "test/precision", "test/f1", "test/auc"):
        assert b.metrics[k] == pytest.approx(a.metrics[k])
    # photo-counting Wilson on the three copies: the too-narrow interval this replaces
    tp = int(round(a.metrics["test/recall"] * 30))
    naive = stats.binomtest(3 * tp, 90).proportion_ci(method="wilson")
    assert naive.high - naive.low < 0.7 * wa["test/recall"] <= wb["test/recall"]


def test_a_subject_with_many_photos_widens_its_interval():
    """One missed patient with twenty photos weighs twenty times in the photo-level recall; the effective sample
    size the subject bootstrap finds makes the interval wider than Wilson with every patient counted once."""
    t = _table(40, 200, seed=2)
    t.loc[0, "probability"] = 0.01  # a missed patient ...
    t = pd.concat([t] + [t.iloc[[0]]] * 19, ignore_index=True)  # ... with twenty photos
    r = build_report(t, threshold=0.4, splits=("test",), bootstrap=1000, argmax_split=None)
    recall = r.metrics["test/recall"]
    lo, hi = r.metrics["test/recall/ci_low"], r.metrics["test/recall/ci_high"]
    w_lo, w_hi = stats.binomtest(round(recall * 40), 40).proportion_ci(method="wilson")
    assert hi - lo > 1.1 * (w_hi - w_lo)


# ------------------------------------------------------------------------------------------------ decision curve

@pytest.mark.parametrize("prevalence", [None, 0.02])
def test_decision_curve_agrees_with_dcurves(prevalence):
    import dcurves  # the test extra: a second implementation to check against
    t = _table(60, 240, seed=3)
    ours = decision_curve(t, THRESHOLDS, prevalence, n_boot=300, seed=0)
    ref = dcurves.dca(data=t[["label", "probability"]], outcome="label", modelnames=["probability"],
                      thresholds=THRESHOLDS, prevalence=prevalence)
    by = {m: g.set_index("threshold")["net_benefit"] for m, g in ref.groupby("model")}
    assert np.allclose(ours["net_benefit"], by["probability"].reindex(THRESHOLDS).to_numpy(), atol=1e-12)
    assert np.allclose(ours["treat_all"], by["all"].reindex(THRESHOLDS).to_numpy(), atol=1e-12)
    assert np.allclose(by["none"].to_numpy(), 0) and (ours["treat_none"] == 0).all()
    inside = (ours["ci_low"] <= ours["net_benefit"] + 1e-12) & (ours["net_benefit"] <= ours["ci_high"] + 1e-12)
    assert inside.all() and (ours["ci_high"] > ours["ci_low"]).any()


def test_net_benefit_at_the_operating_threshold_is_logged_in_closed_form():
    t = _table(50, 150, seed=4, split="test")
    r = build_report(t, threshold=0.35, splits=("test",), bootstrap=200, prevalence=0.05, argmax_split=None)
    y, p = t["label"].to_numpy(), t["probability"].to_numpy()
    sens, spec = ((p >= 0.35) & (y == 1)).sum() / 50, ((p < 0.35) & (y == 0)).sum() / 150
    assert r.metrics["test/net_benefit"] == pytest.approx(sens * 0.05 - (1 - spec) * 0.95 * 0.35 / 0.65)
    assert r.metrics["test/net_benefit/treat_all"] == pytest.approx(0.05 - 0.95 * 0.35 / 0.65)
    assert r.metrics["test/net_benefit/ci_low"] <= r.metrics["test/net_benefit"] <= r.metrics[
        "test/net_benefit/ci_high"]
    assert list(r.decision_curve["threshold"]) == list(THRESHOLDS)


# ------------------------------------------------------------------------------------------------ guarantee

@pytest.mark.parametrize("seed", range(4))
def test_the_guaranteed_bound_is_the_logged_one_when_only_test_repeats_photos(seed):
    """One photo per validation subject, two of one test subject: the report takes every split's intervals from
    the subject bootstrap, and so does the guarantee; its bound is the logged val/recall/ci_low (on these seeds
    the validation-only choice, Wilson, claimed a bound of 0.904 beside a logged 0.900)."""
    rng = np.random.default_rng(5500 + seed)
    rows = [(f"v{i}", "val", int(i < 55)) for i in range(155)] + [(f"t{i}", "test", int(i < 20)) for i in range(80)]
    pred = pd.DataFrame(rows + [("t0", "test", 1)], columns=["subject", "split", "label"]).assign(sex="F")
    pred["probability"] = np.where(pred["label"] == 1, rng.beta(5, 2, len(pred)), rng.beta(2, 5, len(pred)))
    repeats = intervals.photos_repeat(pred)
    assert repeats and not intervals.photos_repeat(pred[pred["split"] == "val"])
    op = thresholds.operating_point(pred[pred["split"] == "val"], "sensitivity_lcb:0.9", n_boot=2000, seed=seed,
                                    repeats=repeats)
    r = build_report(pred, threshold=op.threshold, bootstrap=2000, seed=seed)
    assert r.tags["interval_method"] == "subject_bootstrap"
    assert r.metrics["val/recall/ci_low"] == pytest.approx(op.lower_bound, abs=1e-12)
    assert op.met == (op.lower_bound >= 0.9)


def test_guarantee_is_refused_when_the_validation_set_is_too_small():
    """16 validation patients (the paper's split) cannot promise recall 0.9 even if every one is found:
    n / (n + z^2) = 0.806; it takes 35."""
    why = thresholds.unattainable("sensitivity_lcb:0.9", patients=16, controls=98)
    assert "16 patients" in why and "at least 35" in why and "0.806" in why
    assert thresholds.subjects_needed(0.9, 1.0) == 35 and 35 / (35 + Z ** 2) >= 0.9 > 34 / (34 + Z ** 2)
    assert thresholds.unattainable("sensitivity_lcb:0.9", patients=35, controls=0) is None
    assert "controls" in thresholds.unattainable("specificity_lcb:0.95", patients=400, controls=40)
    assert thresholds.unattainable("sensitivity:0.9", patients=1, controls=1) is None
    for bad in ("sensitivity_lcb:1", "specificity_lcb:0", "sensitivity_lcb:x"):
        with pytest.raises(ValueError):
            thresholds.parse_threshold_rule(bad)


@pytest.mark.parametrize("copies", [1, 3])
def test_guarantee_is_met_on_a_large_validation_set(copies):
    """400 validation patients: the highest cut-off whose subject-level 95% lower bound reaches 0.9; the next
    cut-off up does not reach it; the bound is the report's own val/recall/ci_low."""
    val = _table(400, 1200, seed=5, copies=copies, split="val")
    op = thresholds.operating_point(val, "sensitivity_lcb:0.9", n_boot=300, seed=0)
    assert op.met and op.lower_bound >= 0.9 and "guaranteed" in op.statement
    r = build_report(val, threshold=op.threshold, splits=("val",), bootstrap=300, seed=0, argmax_split=None)
    assert r.metrics["val/recall/ci_low"] == pytest.approx(op.lower_bound, abs=1e-12)
    y, p = val["label"].to_numpy(), val["probability"].to_numpy()
    higher = np.unique(p)[np.unique(p) > op.threshold][0] + 1e-9  # the next cut-off up
    up = build_report(val, threshold=higher, splits=("val",), bootstrap=300, seed=0, argmax_split=None)
    assert up.metrics["val/recall/ci_low"] < 0.9 <= op.lower_bound
    if copies == 1:
        k = int(((p >= op.threshold) & (y == 1)).sum())
        assert op.lower_bound == pytest.approx(stats.binomtest(k, 400).proportion_ci(method="wilson").low)
    plain = thresholds.choose_threshold(y, p, "sensitivity:0.9")
    assert op.threshold <= plain, "a guarantee costs specificity, never recall"


def test_specificity_guarantee_picks_the_lowest_cut_off():
    val = _table(300, 900, seed=6, split="val")
    op = thresholds.operating_point(val, "specificity_lcb:0.9")
    y, p = val["label"].to_numpy(), val["probability"].to_numpy()
    tn = int(((p < op.threshold) & (y == 0)).sum())
    assert op.met and stats.binomtest(tn, 900).proportion_ci(method="wilson").low >= 0.9
    lower = np.unique(p)[np.unique(p) < op.threshold][-1] - 1e-9
    tn_lower = int(((p < lower) & (y == 0)).sum())
    assert stats.binomtest(tn_lower, 900).proportion_ci(method="wilson").low < 0.9


# ------------------------------------------------------------------------------------------------ size

@pytest.mark.parametrize("p,width", [(0.85, 0.2), (0.9, 0.1), (0.7, 0.3)])
def test_sample_size_matches_buderer_and_statsmodels(p, width):
    import statsmodels.stats.proportion as smp  # the test extra
    n = size.proportion_needed(p, width)
    assert n == math.ceil(Z ** 2 * p * (1 - p) / (width / 2) ** 2)  # Buderer (1996), eq. for TP + FN
    assert n == math.ceil(smp.samplesize_confint_proportion(p, width / 2, alpha=0.05, method="normal") - 1e-9)
    lo, hi = smp.proportion_confint(round(p * 40), 40, alpha=0.05, method="normal")
    assert size.proportion_width(round(p * 40) / 40, 40) == pytest.approx(hi - lo)


def test_auc_sizes_follow_hanley_mcneil():
    def se(a, n1, n2):  # Hanley & McNeil (1982), eq. 2
        q1, q2 = a / (2 - a), 2 * a * a / (1 + a)
        return math.sqrt((a * (1 - a) + (n1 - 1) * (q1 - a * a) + (n2 - 1) * (q2 - a * a)) / (n1 * n2))
    assert size.auc_width(0.9, 16, 98) == pytest.approx(2 * Z * se(0.9, 16, 98))
    n1 = size.auc_needed(0.9, 0.1, 3.0)
    assert 2 * Z * se(0.9, n1, math.ceil(3 * n1)) <= 0.1 < 2 * Z * se(0.9, n1 - 1, 3 * (n1 - 1))
    n2 = size.auc_controls(0.9, 0.1, 200)
    assert 2 * Z * se(0.9, 200, n2) <= 0.1 < 2 * Z * se(0.9, 200, n2 - 1)


def test_cushing_size_on_the_demo_cohort(demo_manifest, capsys):
    """The paper's split: 16 test patients, 12 of them women; counted in subjects, per sex; one-line errors."""
    from cushing.cli import main

    assert main(["size", "--manifest", str(demo_manifest), "--sensitivity", "0.85", "--specificity", "0.9",
                 "--auc", "0.9", "--width", "0.2"]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split() for line in out.splitlines()[2:]}
    assert rows["overall"][1:3] == ["16", "98"] and rows["female"][1:3] == ["12", "87"]
    assert float(rows["female"][3]) == pytest.approx(2 * Z * math.sqrt(0.85 * 0.15 / 12), abs=1e-3)
    assert rows["female"][6] == str(size.proportion_needed(0.85, 0.2)) == "49"
    for args, says in ((["--sensitivity", "1.2"], "sensitivity"), (["--width", "0"], "width")):
        assert main(["size", "--manifest", str(demo_manifest), *args]) == 2
        err = capsys.readouterr().err
        assert says in err and len(err.strip().splitlines()) == 1
    assert size.known_to({"female": 25}).startswith("with 25 female patients in test, recall is known to about ±0.14")


def test_cushing_size_refuses_a_cohort_without_patients(tmp_path, demo_manifest, capsys):
    from cushing.cli import main

    df = pd.read_csv(demo_manifest)
    df["image"] = [str(demo_manifest.parent / p) for p in df["image"]]
    df[df["label"] == 0].to_csv(tmp_path / "controls.csv", index=False)
    assert main(["size", "--manifest", str(tmp_path / "controls.csv")]) == 2
    err = capsys.readouterr().err
    assert "no patients" in err and len(err.strip().splitlines()) == 1


# ------------------------------------------------------------------------------------------------ end to end

def _demo_cfg(data, **kw):
    from cushing.config import TrainConfig

    return TrainConfig(**{**dict(data=str(data), model="resnet18", pretrained=False, epochs=1, img_size=48,
                                 bootstrap=200, cam=False, experiment="guarantee", audit="off"), **kw})


@pytest.mark.slow
def test_a_training_run_refuses_a_guarantee_its_validation_split_cannot_give(tracking, small_demo, capsys):
    """The paper's split has 16 validation patients: sensitivity_lcb:0.9 is refused before training, in one line,
    and no run is left behind."""
    import mlflow

    from cushing.cli import main

    rc = main(["train", "--data", str(small_demo), "--model", "resnet18", "--pretrained", "false", "--epochs", "1",
               "--img-size", "48", "--audit", "off", "--experiment", "guarantee", "--threshold",
               "sensitivity_lcb:0.9"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert "16 patients" in err and "at least 35" in err
    exp = mlflow.MlflowClient().get_experiment_by_name("guarantee")
    assert exp is None or not mlflow.MlflowClient().search_runs([exp.experiment_id])


@pytest.mark.slow
def test_a_met_guarantee_is_in_the_run_the_card_and_the_served_answer(tracking, demo_manifest, tmp_path):
    """With 1:6:1 the demo's validation split holds ~36 patients: recall 0.9 can be promised. The run, the logged
    model's answer and its card say so; the run also logs its decision curve."""
    import mlflow

    from cushing.data.demo import synthetic_jpeg_b64
    from cushing.release.card import CardInputs, render_card
    from cushing.workflows.experiment import run_experiment

    df = pd.read_csv(demo_manifest).drop(columns="split")
    df["image"] = [str(demo_manifest.parent / p) for p in df["image"]]
    df.to_csv(tmp_path / "demo.csv", index=False)
    summary = run_experiment(_demo_cfg(tmp_path / "demo.csv", split_ratios="1:6:1", threshold="sensitivity_lcb:0.9"),
                             progress=False)
    run = mlflow.MlflowClient().get_run(summary.run_id)
    m, tags = run.data.metrics, run.data.tags
    assert "guaranteed" in tags["threshold_guarantee"] and m["threshold/guarantee_met"] == 1
    assert m["threshold/lower_bound"] == pytest.approx(m["val/recall/ci_low"]) and m["val/recall/ci_low"] >= 0.9
    assert "guaranteed" in summary.selection
    assert {"test/net_benefit", "test/net_benefit/ci_low", "test/ppv/ci_low"} <= set(m)
    names = {a.path for a in mlflow.MlflowClient().list_artifacts(summary.run_id)}
    assert "decision_curve.csv" in names
    model = mlflow.pyfunc.load_model(summary.model_uri)
    out = model.predict(pd.DataFrame({"image": [synthetic_jpeg_b64(seed=1)]}))
    assert "sensitivity_lcb:0.9" in out["operating_point"][0] and "guaranteed" in out["operating_point"][0]
    assert "guaranteed" in model.metadata.metadata["description"]
    md, _ = render_card(CardInputs("cushing", "1", summary.run_id, m, dict(run.data.params), tags,
                                   splits=pd.read_csv(mlflow.artifacts.download_artifacts(
                                       run_id=summary.run_id, artifact_path="splits.csv"))))
    assert tags["threshold_guarantee"] in md and "Net benefit at the operating threshold" in md
    assert "Cohort size: with " in md and " female and " in md
