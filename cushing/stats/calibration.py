"""Calibration: Brier score, reliability and expected calibration error, temperature scaling fitted on
validation, and predictive values at a screening prevalence."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd

__all__ = ["brier", "reliability", "ece", "logit", "fit_temperature", "apply_temperature", "ppv_npv"]


def brier(y: np.ndarray, p: np.ndarray) -> float:
    return float(np.mean((np.asarray(p, float) - np.asarray(y, float)) ** 2)) if len(y) else float("nan")


def reliability(y: np.ndarray, p: np.ndarray, bins: int = 10) -> pd.DataFrame:
    """Equal-width bins: mean predicted probability, observed positive rate, count."""
    y, p = np.asarray(y, float), np.asarray(p, float)
    idx = np.minimum((p * bins).astype(int), bins - 1)
    return pd.DataFrame([{"bin": b, "low": b / bins, "high": (b + 1) / bins, "count": int(m.sum()),
                          "mean_predicted": float(p[m].mean()) if m.any() else float("nan"),
                          "observed_rate": float(y[m].mean()) if m.any() else float("nan")}
                         for b, m in enumerate(np.arange(bins)[:, None] == idx)])


def ece(y: np.ndarray, p: np.ndarray, bins: int = 10) -> float:
    """Expected calibration error: count-weighted mean |observed - predicted| over equal-width bins."""
    r = reliability(y, p, bins)
    r = r[r["count"] > 0]
    return float((r["count"] * (r["observed_rate"] - r["mean_predicted"]).abs()).sum() / r["count"].sum()) \
        if not r.empty else float("nan")


def logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, float), 1e-7, 1 - 1e-7)
    return np.log(p / (1 - p))


def fit_temperature(y_val: np.ndarray, p_val: np.ndarray) -> float:
    """Temperature T minimising validation NLL of sigmoid(logit(p) / T)."""
    from scipy.optimize import minimize_scalar

    z, y = logit(p_val), np.asarray(y_val, float)

    def nll(log_t: float) -> float:
        q = np.clip(1 / (1 + np.exp(-z / math.exp(log_t))), 1e-12, 1 - 1e-12)
        return float(-np.mean(y * np.log(q) + (1 - y) * np.log(1 - q)))
    res = minimize_scalar(nll, bounds=(-4, 4), method="bounded")
    return float(math.exp(res.x))


def apply_temperature(p: np.ndarray, temperature: float) -> np.ndarray:
    return np.asarray(p, float) if temperature == 1.0 else 1 / (1 + np.exp(-logit(p) / temperature))


def ppv_npv(sensitivity: float, specificity: float, prevalence: float) -> tuple[float, float]:
    """Predictive values at a screening prevalence (Bayes), since a study's test prevalence is inflated."""
    tp, fp = sensitivity * prevalence, (1 - specificity) * (1 - prevalence)
    tn, fn = specificity * (1 - prevalence), (1 - sensitivity) * prevalence
    return float(tp / (tp + fp) if tp + fp > 0 else "nan"), float(tn / (tn + fn) if tn + fn > 0 else "nan")
