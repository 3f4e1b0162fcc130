"""Decision curve analysis (Vickers & Elkin 2006): the net benefit of acting on the model's score across threshold
probabilities, against treating everyone and no one, with bands from the subject bootstrap the intervals use.
Net benefit = true positives/n - false positives/n x t/(1 - t): true cases found, less unnecessary work-ups
weighted by how many a clinician would accept per case at threshold t. At a screening `prevalence` the cohort's
cases and controls are re-weighted to it (sensitivity x prevalence - (1 - specificity) x (1 - prevalence) x odds),
since a case-control cohort's prevalence is not the population's."""
from __future__ import annotations

import numpy as np
import pandas as pd

from cushing.stats.intervals import percentile_interval, resample_weights
from cushing.stats.metrics import Counts, confusion, rates

__all__ = ["THRESHOLDS", "net_benefit", "decision_curve"]

THRESHOLDS = np.round(np.arange(0.01, 0.501, 0.01), 2)  # a screening range: acting at 1% to 50% risk


def net_benefit(c: Counts, thresholds: np.ndarray, prevalence: float | None = None) -> np.ndarray:
    """[resamples, thresholds] net benefit of `p >= t` at each t (the cohort's own prevalence when None)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        odds = np.where(thresholds < 1, thresholds / (1 - thresholds), np.nan)
        if prevalence is None:
            return (c.tp - c.fp * odds) / (c.tp + c.fp + c.fn + c.tn)
        r = rates(c)
        return r["recall"] * prevalence - (1 - r["specificity"]) * (1 - prevalence) * odds


def decision_curve(part: pd.DataFrame, thresholds: np.ndarray = THRESHOLDS, prevalence: float | None = None,
                   n_boot: int = 2000, seed: int = 0) -> pd.DataFrame:
    """threshold, net_benefit with its 95% subject-bootstrap band (ci_low, ci_high), treat_all, treat_none."""
    t = np.asarray(thresholds, float)
    y, p = part["label"].to_numpy(), part["probability"].to_numpy(float)
    nb = net_benefit(confusion(y, p, t), t, prevalence)[0]
    band = np.full((len(t), 2), np.nan)
    if n_boot > 0 and len(part):
        boot = net_benefit(confusion(y, p, t, resample_weights(part, n_boot, seed)), t, prevalence)
        band = np.array([percentile_interval(boot[:, i]) for i in range(len(t))])
    prev = float(np.mean(y)) if prevalence is None else prevalence  # treating all: everyone counts as positive
    with np.errstate(invalid="ignore", divide="ignore"):
        all_ = prev - (1 - prev) * np.where(t < 1, t / (1 - t), np.nan)
    return pd.DataFrame({"threshold": t, "net_benefit": nb, "ci_low": band[:, 0], "ci_high": band[:, 1],
                         "treat_all": all_, "treat_none": 0.0})
