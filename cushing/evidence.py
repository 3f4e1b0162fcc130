"""Statistics that keep small-n numbers honest.

Wilson intervals, subject-level stratified bootstrap, thresholds chosen on validation, calibration, sex gaps,
DeLong and McNemar paired tests with Holm correction. Pure functions over arrays and predictions tables.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

__all__ = [
    "wilson", "bootstrap_metrics", "parse_threshold_rule", "choose_threshold", "ThresholdRule",
    "brier", "ece", "reliability", "fit_temperature", "apply_temperature", "ppv_npv", "logit", "delong_test",
    "mcnemar_test", "holm", "subject_weights", "sex_gaps",
]

Z95 = 1.959963984540054


def wilson(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for k successes in n trials; NaN when n == 0."""
    if n <= 0:
        return (float("nan"), float("nan"))
    ph = k / n
    denom = 1 + z * z / n
    centre = (ph + z * z / (2 * n)) / denom
    half = z * math.sqrt(ph * (1 - ph) / n + z * z / (4 * n * n)) / denom
    lo = 0.0 if k == 0 else max(0.0, centre - half)
    hi = 1.0 if k == n else min(1.0, centre + half)
    return (lo, hi)


# --------------------------------------------------------------------------------------------- bootstrap

def subject_weights(subjects: np.ndarray, strata: np.ndarray, n_boot: int, seed: int) -> np.ndarray:
    """[B, n_images] weights: how often each image's subject was drawn in each resample.

    Subjects are resampled with replacement within strata (label x sex of the subject), so a subject's images
    always travel together and each resample keeps the stratum sizes.
    """
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


def _weighted_metrics(w: np.ndarray, y: np.ndarray, p: np.ndarray, thr: float) -> dict[str, np.ndarray]:
    """Vectorised F1 and AUC (and proportions) for every resample's weights at once."""
    y = y.astype(bool)
    pred = p >= thr
    tp = w @ (pred & y)
    fp = w @ (pred & ~y)
    fn = w @ (~pred & y)
    tn = w @ (~pred & ~y)
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = np.where(tp + fn > 0, 2 * tp / (2 * tp + fp + fn), np.nan)
        out = {"f1": f1, "recall": tp / (tp + fn), "specificity": tn / (tn + fp), "precision": tp / (tp + fp),
               "accuracy": (tp + tn) / (tp + fp + fn + tn)}
    # AUC: for each distinct score, weighted positives x (negatives strictly below + half of ties)
    order = np.argsort(p, kind="stable")
    ps, ys, ws = p[order], y[order], w[:, order]
    _, first = np.unique(ps, return_index=True)
    pos_w = np.add.reduceat(ws * ys, first, axis=1)
    neg_w = np.add.reduceat(ws * ~ys, first, axis=1)
    below = np.cumsum(neg_w, 1) - neg_w
    num = (pos_w * (below + 0.5 * neg_w)).sum(1)
    den = pos_w.sum(1) * neg_w.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        out["auc"] = np.where(den > 0, num / den, np.nan)
    return out


def _percentile(v: np.ndarray) -> tuple[float, float]:
    v = v[np.isfinite(v)]
    if len(v) < 10:
        return (float("nan"), float("nan"))
    lo, hi = np.percentile(v, [2.5, 97.5])
    return (float(lo), float(hi))


def bootstrap_metrics(part: pd.DataFrame, *, threshold: float, n_boot: int = 2000, seed: int = 0,
                      metrics: tuple[str, ...] = ("f1", "auc")) -> dict[tuple[str, str], tuple[float, float]]:
    """(group, metric) -> 95% percentile interval, resampling subjects within label x sex strata.

    Also gives (gap, metric) for female minus male differences of recall, specificity and f1.
    """
    if part.empty or n_boot <= 0:
        return {}
    y = part["label"].to_numpy()
    p = part["probability"].to_numpy().astype(float)
    sex = part["sex"].to_numpy()
    subj_label = part.groupby("subject")["label"].transform("max").to_numpy()
    w = subject_weights(part["subject"].to_numpy(), np.char.add(sex.astype(str), subj_label.astype(str)), n_boot, seed)
    out: dict[tuple[str, str], tuple[float, float]] = {}
    per_group = {}
    for group, mask in (("overall", np.ones(len(y), bool)), ("female", sex == "F"), ("male", sex == "M")):
        if not mask.any():
            continue
        per_group[group] = _weighted_metrics(w[:, mask], y[mask], p[mask], threshold)
        for m in metrics:
            out[(group, m)] = _percentile(per_group[group][m])
    if "female" in per_group and "male" in per_group:
        for m in ("recall", "specificity", "f1"):
            out[("gap", m)] = _percentile(per_group["female"][m] - per_group["male"][m])
    return out


def sex_gaps(part: pd.DataFrame, threshold: float, boot: dict[tuple[str, str], tuple[float, float]],
             min_positives: int) -> dict[str, tuple[float, float, float, bool]]:
    """metric -> (female - male, ci_low, ci_high, estimable) for recall, specificity, f1; intervals from the
    ("gap", metric) entries of `boot` (bootstrap_metrics of the same rows; empty: no intervals)."""
    from .metrics import point_metrics

    f, m = part[part["sex"] == "F"], part[part["sex"] == "M"]
    if f.empty or m.empty:
        return {}
    pf = point_metrics(f["label"].to_numpy(), f["probability"].to_numpy(), threshold)
    pm = point_metrics(m["label"].to_numpy(), m["probability"].to_numpy(), threshold)
    enough = min(int(f["label"].sum()), int(m["label"].sum())) >= min_positives
    out = {}
    for metric in ("recall", "specificity", "f1"):
        est = enough or metric == "specificity"
        lo, hi = boot.get(("gap", metric), (float("nan"), float("nan")))
        gap = pf[metric] - pm[metric]
        out[metric] = (gap if est else float("nan"), lo if est else float("nan"), hi if est else float("nan"),
                       est and math.isfinite(gap))
    return out


# --------------------------------------------------------------------------------------------- thresholds

@dataclass(frozen=True)
class ThresholdRule:
    kind: str  # f1 | youden | sensitivity | fixed
    value: float = float("nan")

    def __str__(self) -> str:
        return {"f1": "f1", "youden": "youden"}.get(self.kind) or (
            f"sensitivity:{self.value:g}" if self.kind == "sensitivity" else f"{self.value:g}")


def parse_threshold_rule(text: str) -> ThresholdRule:
    t = str(text).strip().lower()
    if t in ("f1", "youden"):
        return ThresholdRule(t)
    if t in ("argmax", "0.5"):
        return ThresholdRule("fixed", 0.5)
    if t.startswith("sensitivity:") or t.startswith("recall:"):
        v = float(t.split(":", 1)[1])
        if not 0 < v <= 1:
            raise ValueError(f"target sensitivity must be in (0, 1], got {v}")
        return ThresholdRule("sensitivity", v)
    try:
        v = float(t)
    except ValueError:
        raise ValueError(f"expected f1, youden, sensitivity:X or a number in (0, 1), got {text!r}") from None
    if not 0 < v < 1:
        raise ValueError(f"a fixed threshold must be in (0, 1), got {v}")
    return ThresholdRule("fixed", v)


def _cutoffs(p: np.ndarray) -> np.ndarray:
    """Candidate thresholds: midpoints between distinct scores, plus one above the maximum."""
    u = np.unique(p)
    mids = (u[:-1] + u[1:]) / 2 if len(u) > 1 else np.array([])
    return np.concatenate([[u[0] / 2 if u[0] > 0 else 0.0], mids, [min(1.0, (u[-1] + 1) / 2)]])


def choose_threshold(y_val: np.ndarray, p_val: np.ndarray, rule: ThresholdRule | str) -> float:
    """The operating threshold, from validation labels and scores only."""
    rule = parse_threshold_rule(rule) if isinstance(rule, str) else rule
    if rule.kind == "fixed":
        return float(rule.value)
    y = np.asarray(y_val).astype(bool)
    p = np.asarray(p_val, float)
    if y.sum() == 0 or (~y).sum() == 0:
        return 0.5  # nothing to choose with; argmax is the honest default
    cuts = _cutoffs(p)
    pred = p[None, :] >= cuts[:, None]
    tp = (pred & y).sum(1)
    fp = (pred & ~y).sum(1)
    fn = (~pred & y).sum(1)
    tn = (~pred & ~y).sum(1)
    tpr, fpr = tp / (tp + fn), fp / (fp + tn)
    if rule.kind == "f1":
        score = 2 * tp / np.maximum(2 * tp + fp + fn, 1)
    elif rule.kind == "youden":
        score = tpr - fpr
    else:  # highest specificity with sensitivity >= target
        ok = tpr >= rule.value - 1e-12
        score = np.where(ok, 1 - fpr, -np.inf)
    best = np.flatnonzero(score == score.max())
    # among ties prefer the threshold closest to 0.5 (least extreme)
    return float(cuts[best[np.argmin(np.abs(cuts[best] - 0.5))]])


# --------------------------------------------------------------------------------------------- calibration

def brier(y: np.ndarray, p: np.ndarray) -> float:
    return float(np.mean((np.asarray(p, float) - np.asarray(y, float)) ** 2)) if len(y) else float("nan")


def reliability(y: np.ndarray, p: np.ndarray, bins: int = 10) -> pd.DataFrame:
    """Equal-width bins: mean predicted probability, observed positive rate, count."""
    y, p = np.asarray(y, float), np.asarray(p, float)
    idx = np.minimum((p * bins).astype(int), bins - 1)
    rows = []
    for b in range(bins):
        m = idx == b
        rows.append({"bin": b, "low": b / bins, "high": (b + 1) / bins, "count": int(m.sum()),
                     "mean_predicted": float(p[m].mean()) if m.any() else float("nan"),
                     "observed_rate": float(y[m].mean()) if m.any() else float("nan")})
    return pd.DataFrame(rows)


def ece(y: np.ndarray, p: np.ndarray, bins: int = 10) -> float:
    """Expected calibration error: count-weighted mean |observed - predicted| over equal-width bins."""
    r = reliability(y, p, bins)
    r = r[r["count"] > 0]
    if r.empty:
        return float("nan")
    return float((r["count"] * (r["observed_rate"] - r["mean_predicted"]).abs()).sum() / r["count"].sum())


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
    if temperature == 1.0:
        return np.asarray(p, float)
    return 1 / (1 + np.exp(-logit(p) / temperature))


def ppv_npv(sensitivity: float, specificity: float, prevalence: float) -> tuple[float, float]:
    """Predictive values at a screening prevalence (Bayes), since a study's test prevalence is inflated."""
    tp = sensitivity * prevalence
    fp = (1 - specificity) * (1 - prevalence)
    tn = specificity * (1 - prevalence)
    fn = (1 - sensitivity) * prevalence
    ppv = tp / (tp + fp) if tp + fp > 0 else float("nan")
    npv = tn / (tn + fn) if tn + fn > 0 else float("nan")
    return float(ppv), float(npv)


# --------------------------------------------------------------------------------------------- paired tests

def _midrank(x: np.ndarray) -> np.ndarray:
    from scipy.stats import rankdata
    return rankdata(x)


def delong_test(y: np.ndarray, p1: np.ndarray, p2: np.ndarray) -> dict[str, float]:
    """DeLong's test for two correlated AUCs on the same cases (fast midrank form, Sun & Xu 2014)."""
    from scipy.stats import norm

    y = np.asarray(y).astype(bool)
    m, n = int(y.sum()), int((~y).sum())
    if m < 2 or n < 2:
        return {"auc1": float("nan"), "auc2": float("nan"), "diff": float("nan"), "z": float("nan"),
                "p_value": float("nan"), "se": float("nan")}
    aucs, v10s, v01s = [], [], []
    for p in (np.asarray(p1, float), np.asarray(p2, float)):
        pos, neg = p[y], p[~y]
        tx, ty, tz = _midrank(pos), _midrank(neg), _midrank(np.concatenate([pos, neg]))
        auc = (tz[:m].sum() - m * (m + 1) / 2) / (m * n)
        v10s.append((tz[:m] - tx) / n)  # structural components of positives
        v01s.append(1 - (tz[m:] - ty) / m)  # of negatives
        aucs.append(auc)
    s10 = np.cov(np.vstack(v10s))
    s01 = np.cov(np.vstack(v01s))
    cov = s10 / m + s01 / n
    var = cov[0, 0] + cov[1, 1] - 2 * cov[0, 1]
    diff = aucs[0] - aucs[1]
    if var <= 0:
        z, pval = (0.0, 1.0) if diff == 0 else (float("inf"), 0.0)
    else:
        z = diff / math.sqrt(var)
        pval = float(2 * norm.sf(abs(z)))
    return {"auc1": float(aucs[0]), "auc2": float(aucs[1]), "diff": float(diff), "z": float(z),
            "p_value": pval, "se": float(math.sqrt(max(var, 0.0)))}


def mcnemar_test(correct1: np.ndarray, correct2: np.ndarray) -> dict[str, float]:
    """Exact McNemar test on the discordant pairs (b: only model 1 right, c: only model 2 right)."""
    from scipy.stats import binomtest

    c1, c2 = np.asarray(correct1, bool), np.asarray(correct2, bool)
    b, c = int((c1 & ~c2).sum()), int((~c1 & c2).sum())
    pval = 1.0 if b + c == 0 else float(binomtest(b, b + c, 0.5).pvalue)
    return {"b": b, "c": c, "p_value": pval}


def holm(pvalues: list[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values (NaNs pass through)."""
    p = np.asarray(pvalues, float)
    ok = np.flatnonzero(np.isfinite(p))
    adj = np.full(len(p), np.nan)
    order = ok[np.argsort(p[ok], kind="stable")]
    running = 0.0
    k = len(order)
    for i, j in enumerate(order):
        running = max(running, min(1.0, (k - i) * p[j]))
        adj[j] = running
    return adj.tolist()
