"""Honest statistics at small n: Wilson, subject bootstrap, thresholds on validation, calibration, paired tests."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats
from sklearn.metrics import roc_auc_score

from cushing.stats import calibration, intervals, metrics, paired, thresholds
from cushing.stats.intervals import Gap
from cushing.stats.subgroups import subgroups_of


def test_wilson_known_values():
    lo, hi = intervals.wilson(14, 16)  # the example: 14/16 sensitivity
    assert lo == pytest.approx(0.640, abs=0.002) and hi == pytest.approx(0.965, abs=0.002)
    # agrees with statsmodels-style reference computed from the closed form via scipy's normal quantile
    z = stats.norm.ppf(0.975)
    k, n = 3, 10
    p = k / n
    centre = (p + z**2 / (2 * n)) / (1 + z**2 / n)
    half = z / (1 + z**2 / n) * math.sqrt(p * (1 - p) / n + z**2 / (4 * n**2))
    assert intervals.wilson(k, n) == pytest.approx((centre - half, centre + half))
    assert intervals.wilson(0, 10)[0] == 0.0 and intervals.wilson(10, 10)[1] == 1.0
    assert all(math.isnan(v) for v in intervals.wilson(0, 0))


def test_bootstrap_resamples_subjects_not_images():
    subjects = np.array(["a", "a", "a", "b", "c", "c", "d"])
    strata = np.array(["F1", "F1", "F1", "F0", "M1", "M1", "M0"])
    w = intervals.subject_weights(subjects, strata, n_boot=300, seed=0)
    # the images of one subject always carry the same weight: a subject never splits across a resample
    assert (w[:, 0] == w[:, 1]).all() and (w[:, 1] == w[:, 2]).all() and (w[:, 4] == w[:, 5]).all()
    # stratified: each stratum keeps its number of subjects (here one subject per stratum -> weight 1)
    assert (w == 1).all()
    subjects = np.array([f"s{i // 2}" for i in range(40)])
    strata = np.where(np.arange(40) < 20, "F0", "F1")
    w = intervals.subject_weights(subjects, strata, n_boot=200, seed=1)
    assert (w[:, ::2] == w[:, 1::2]).all()
    assert np.allclose(w[:, :20].sum(1), 20) and np.allclose(w[:, 20:].sum(1), 20)


def _subject_weights_one_resample_at_a_time(subjects, strata, n_boot, seed):
    """The bootstrap's weights as they were computed before vectorising: a bincount per resample and stratum."""
    rng = np.random.default_rng(seed)
    uniq, inv = np.unique(subjects, return_inverse=True)
    subj_stratum = pd.Series(strata).groupby(inv).first().to_numpy()
    draws = np.zeros((n_boot, len(uniq)), dtype=np.float64)
    for s in np.unique(subj_stratum):
        members = np.flatnonzero(subj_stratum == s)
        picks = rng.integers(0, len(members), size=(n_boot, len(members)))
        for b in range(n_boot):
            draws[b] += np.bincount(members[picks[b]], minlength=len(uniq))
    return draws[:, inv]


@pytest.mark.parametrize("seed", [0, 7])
def test_vectorised_subject_bootstrap_draws_the_same_resamples(seed):
    """Same seed, same random draws, same weights (exactly): every interval keeps its value."""
    rng = np.random.default_rng(seed)
    subjects = np.array([f"s{i}" for i in rng.integers(0, 90, 240)])  # subjects with several images
    strata = np.array([f"{s}{int(int(x[1:]) % 7 == 0)}" for x, s in zip(subjects, rng.choice(["F", "M"], 240))])
    strata = pd.Series(strata).groupby(subjects).transform("first").to_numpy()  # one stratum per subject
    got = intervals.subject_weights(subjects, strata, n_boot=500, seed=seed)
    assert np.array_equal(got, _subject_weights_one_resample_at_a_time(subjects, strata, 500, seed))


def _table(n=200, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    return pd.DataFrame({"subject": [f"s{i}" for i in range(n)], "sex": rng.choice(["F", "M"], n), "label": y,
                         "probability": np.clip(0.3 * y + 0.7 * rng.random(n), 0, 1)})


def test_bootstrap_intervals_cover_point_and_are_seeded():
    part = _table()
    groups, gap = subgroups_of(part, ("sex",)), (Gap("sex_gap", ("female", "male"), "difference"),)
    a = intervals.bootstrap(part, groups, threshold=0.5, n_boot=1000, seed=3, gaps=gap)
    b = intervals.bootstrap(part, groups, threshold=0.5, n_boot=1000, seed=3, gaps=gap)
    assert a == b
    auc = roc_auc_score(part["label"], part["probability"])
    lo, hi = a[("overall", "auc")]
    assert lo < auc < hi and 0.05 < hi - lo < 0.3
    # vectorised weighted AUC equals sklearn's with sample weights on one resample
    w = intervals.subject_weights(part["subject"].to_numpy(), part["label"].astype(str).to_numpy(), 1, 5)[0]
    got = metrics.auc(part["label"].to_numpy(), part["probability"].to_numpy(), w[None, :])
    assert got[0] == pytest.approx(roc_auc_score(part["label"], part["probability"], sample_weight=w))
    assert ("sex_gap", "recall") in a


def test_threshold_rules_use_validation_only():
    rng = np.random.default_rng(0)
    y = np.r_[np.zeros(80, int), np.ones(20, int)]
    p = np.clip(np.r_[rng.normal(0.3, 0.12, 80), rng.normal(0.6, 0.12, 20)], 0, 1)
    t_f1 = thresholds.choose_threshold(y, p, "f1")
    f1s = {t: 2 * ((p >= t) & (y == 1)).sum() / ((p >= t).sum() + y.sum()) for t in np.unique(p)}
    assert 2 * ((p >= t_f1) & (y == 1)).sum() / ((p >= t_f1).sum() + y.sum()) == pytest.approx(max(f1s.values()))
    t_sens = thresholds.choose_threshold(y, p, "sensitivity:0.9")
    assert ((p >= t_sens) & (y == 1)).sum() / 20 >= 0.9
    t_y = thresholds.choose_threshold(y, p, "youden")
    assert 0 < t_y < 1
    assert thresholds.choose_threshold(y, p, "0.3") == 0.3
    with pytest.raises(ValueError):
        thresholds.parse_threshold_rule("banana")


def test_calibration_and_temperature():
    rng = np.random.default_rng(0)
    z = rng.normal(0, 2, 4000)
    y = (rng.random(4000) < 1 / (1 + np.exp(-z))).astype(int)
    p_over = 1 / (1 + np.exp(-3 * z))  # overconfident by a factor of 3
    t = calibration.fit_temperature(y, p_over)
    assert t == pytest.approx(3.0, rel=0.15)
    p_fixed = calibration.apply_temperature(p_over, t)
    assert calibration.ece(y, p_fixed) < calibration.ece(y, p_over)
    assert calibration.brier(y, p_fixed) < calibration.brier(y, p_over)
    assert calibration.brier([0, 1], [0.0, 1.0]) == 0.0


def test_ppv_npv_at_prevalence():
    ppv, npv = calibration.ppv_npv(0.9, 0.8, 0.1)
    assert ppv == pytest.approx(0.09 / (0.09 + 0.18)) and npv == pytest.approx(0.72 / (0.72 + 0.01))


def _delong_reference(y, p1, p2):
    """Independent reference: DeLong's covariance from the Mann-Whitney kernel, written out with loops."""
    pos1, neg1, pos2, neg2 = p1[y == 1], p1[y == 0], p2[y == 1], p2[y == 0]
    m, n = len(pos1), len(neg1)

    def psi(a, b):
        return 1.0 if a > b else 0.5 if a == b else 0.0
    v10 = np.array([[np.mean([psi(x, yy) for yy in neg]) for x in pos] for pos, neg in ((pos1, neg1), (pos2, neg2))])
    v01 = np.array([[np.mean([psi(x, yy) for x in pos]) for yy in neg] for pos, neg in ((pos1, neg1), (pos2, neg2))])
    auc = v10.mean(1)
    s = np.cov(v10) / m + np.cov(v01) / n
    var = s[0, 0] + s[1, 1] - 2 * s[0, 1]
    zz = (auc[0] - auc[1]) / math.sqrt(var)
    return auc, 2 * stats.norm.sf(abs(zz))


def test_delong_against_reference_and_known_example():
    rng = np.random.default_rng(4)
    y = np.r_[np.ones(15, int), np.zeros(25, int)]
    p1 = np.round(y * 0.4 + rng.random(40) * 0.6, 2)
    p2 = np.round(y * 0.2 + rng.random(40) * 0.8, 2)
    got = paired.delong_test(y, p1, p2)
    auc, pval = _delong_reference(y, p1, p2)
    assert got["auc1"] == pytest.approx(auc[0]) and got["auc2"] == pytest.approx(auc[1])
    assert got["p_value"] == pytest.approx(pval, rel=1e-9)
    assert got["auc1"] == pytest.approx(roc_auc_score(y, p1))
    # identical models: no difference
    same = paired.delong_test(y, p1, p1)
    assert same["diff"] == 0 and same["p_value"] == 1.0
    # perfect vs chance separation is decisively significant
    y2 = np.r_[np.ones(30, int), np.zeros(30, int)]
    perfect = np.r_[np.linspace(0.6, 1, 30), np.linspace(0, 0.4, 30)]
    chance = np.tile([0.2, 0.8], 30)
    res = paired.delong_test(y2, perfect, chance)
    assert res["auc1"] == 1.0 and res["auc2"] == 0.5 and res["p_value"] < 1e-6


def test_published_example_hanley_mcneil_1982():
    """Hanley & McNeil (Radiology 1982), Table 1: 109 CT images rated 1-5 by a radiologist, 58 normal and
    51 abnormal; the published area under the ROC curve (ties counted half) is 0.893."""
    normal = np.repeat([1, 2, 3, 4, 5], [33, 6, 6, 11, 2])
    abnormal = np.repeat([1, 2, 3, 4, 5], [3, 2, 2, 11, 33])
    y = np.r_[np.zeros(58, int), np.ones(51, int)]
    ratings = np.r_[normal, abnormal].astype(float)
    res = paired.delong_test(y, ratings, ratings[::-1].copy())
    assert round(res["auc1"], 3) == 0.893
    auc, pval = _delong_reference(y, ratings, ratings[::-1].copy())
    assert res["p_value"] == pytest.approx(pval, rel=1e-9)


def test_mcnemar_hand_checked_and_holm():
    # 2x2: both right 50, only A right 9, only B right 2, both wrong 39 -> exact p = 2 * P(X <= 2 | n=11, 0.5)
    a = np.r_[np.ones(50), np.ones(9), np.zeros(2), np.zeros(39)].astype(bool)
    b = np.r_[np.ones(50), np.zeros(9), np.ones(2), np.zeros(39)].astype(bool)
    r = paired.mcnemar_test(a, b)
    assert (r["b"], r["c"]) == (9, 2)
    assert r["p_value"] == pytest.approx(2 * sum(math.comb(11, k) for k in range(3)) / 2**11)
    assert paired.holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert math.isnan(paired.holm([0.01, float("nan")])[1])


def test_compare_counts_subjects_not_photos(tracking):
    """Two models' test predictions on 60 subjects, logged to a real MLflow store as runs log them; the same
    predictions with every subject photographed three times give the same paired tests, n = subjects."""
    from cushing import tracking as trk
    from cushing.workflows.jobs import compare_runs

    rng = np.random.default_rng(1)
    y = np.r_[np.ones(20, int), np.zeros(40, int)]
    one = pd.DataFrame({"subject": [f"s{i:02d}" for i in range(60)], "split": "test", "sex": "F", "label": y})
    scores = {m: np.clip(0.5 * y + rng.normal(0.25, shift, 60), 0, 1) for m, shift in (("a", 0.2), ("b", 0.3))}

    def runs(copies: int) -> list[str]:
        ids = []
        for m, p in scores.items():
            with trk.start_run(experiment="compare", run_name=m) as r:
                r.log_table(pd.concat([one.assign(probability=p)] * copies, ignore_index=True), "predictions.csv")
                r.log_metrics({"threshold": 0.5})
                ids.append(r.run_id)
        return ids

    once, thrice = (compare_runs(runs(c)).table.iloc[0] for c in (1, 3))
    assert (once["n"], thrice["n"], once["photos"], thrice["photos"]) == (60, 60, 60, 180)
    for k in ("delong_p", "mcnemar_p", "auc_diff", "mcnemar_b", "mcnemar_c"):
        assert thrice[k] == pytest.approx(once[k]), k
