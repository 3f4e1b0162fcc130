"""One metric implementation: weighted confusion counts, the rates made from them, and a rank AUC. Every number
the project reports comes from `confusion` (point metrics, the subject bootstrap's weighted resamples, the choice of
an operating threshold over all cut-offs, ROC points) and `auc`. Undefined values are NaN, never a fake 0."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["METRICS", "PROPORTIONS", "GATED", "GAP_METRICS", "final_metric_problem", "Counts", "confusion", "rates",
           "auc", "point_metrics", "roc_points", "lower_is_better", "cutoffs"]

METRICS = ("accuracy", "precision", "recall", "specificity", "f1", "auc")
PROPORTIONS = ("accuracy", "precision", "recall", "specificity")  # Wilson intervals
GATED = ("precision", "recall", "f1", "auc")  # need enough positives to mean anything
GAP_METRICS = ("recall", "specificity", "f1")  # those with a sex gap and subgroup gaps ({split}/f1/sex_gap)


def final_metric_problem(name: str) -> str | None:
    """Why `name` cannot rank finished runs (a study's objective, promotion): a loss is logged per epoch only."""
    if name.endswith("/loss"):
        return (f"{name} is logged per epoch only (epoch/{name}, for choosing the best epoch); rank finished runs on "
                f"a final metric such as val/f1, val/auc or val/brier")
    return None


def lower_is_better(name: str) -> bool:
    """Direction of a logged metric (best-epoch selection, study objectives, promotion, dashboards): losses,
    Brier score and calibration error go down, everything else up."""
    return name.endswith(("loss", "brier", "ece"))


@dataclass(frozen=True)
class Counts:
    """Confusion counts, each an array shaped [resamples, thresholds] (weights rows x cut-offs)."""

    tp: np.ndarray
    fp: np.ndarray
    fn: np.ndarray
    tn: np.ndarray


def confusion(y: np.ndarray, p: np.ndarray, thresholds: float | np.ndarray,
              weights: np.ndarray | None = None) -> Counts:
    """Weighted confusion counts of `p >= threshold` against `y`, for every threshold and every row of
    `weights` ([B, n]; None: each image counts once) at once."""
    y, p = np.asarray(y).astype(bool), np.asarray(p, float)
    thr = np.atleast_1d(np.asarray(thresholds, float))
    w = np.ones((1, len(y))) if weights is None else np.atleast_2d(np.asarray(weights, float))
    pred = p[None, :] >= thr[:, None]  # [T, n]
    pos, neg = w * y, w * ~y  # [B, n]
    tp, fp = pos @ pred.T, neg @ pred.T
    return Counts(tp, fp, pos.sum(1, keepdims=True) - tp, neg.sum(1, keepdims=True) - fp)


def rates(c: Counts) -> dict[str, np.ndarray]:
    """accuracy, precision, recall, specificity, f1 from counts; NaN where a denominator is 0 (F1: no positives)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        n = c.tp + c.fp + c.fn + c.tn
        return {"accuracy": np.where(n > 0, (c.tp + c.tn) / n, np.nan),
                "precision": np.where(c.tp + c.fp > 0, c.tp / (c.tp + c.fp), np.nan),
                "recall": np.where(c.tp + c.fn > 0, c.tp / (c.tp + c.fn), np.nan),
                "specificity": np.where(c.tn + c.fp > 0, c.tn / (c.tn + c.fp), np.nan),
                "f1": np.where(c.tp + c.fn > 0, 2 * c.tp / (2 * c.tp + c.fp + c.fn), np.nan)}


def auc(y: np.ndarray, p: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """ROC AUC (Mann-Whitney, ties counted half) per row of `weights` ([B]; a 1-element array without weights);
    NaN unless both classes are present."""
    y, p = np.asarray(y).astype(bool), np.asarray(p, float)
    w = np.ones((1, len(y))) if weights is None else np.atleast_2d(np.asarray(weights, float))
    if len(y) == 0:
        return np.full(len(w), np.nan)
    order = np.argsort(p, kind="stable")
    ps, ys, ws = p[order], y[order], w[:, order]
    _, first = np.unique(ps, return_index=True)
    pos_w, neg_w = np.add.reduceat(ws * ys, first, axis=1), np.add.reduceat(ws * ~ys, first, axis=1)
    num = (pos_w * (np.cumsum(neg_w, 1) - neg_w + 0.5 * neg_w)).sum(1)
    den = pos_w.sum(1) * neg_w.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / den, np.nan)


def point_metrics(y: np.ndarray, p: np.ndarray, threshold: float = 0.5) -> dict[str, float]:
    """accuracy, precision, recall, specificity, f1 at `threshold`, and auc, for one set of predictions."""
    out = {k: float(v[0, 0]) for k, v in rates(confusion(y, p, threshold)).items()}
    out["auc"] = float(auc(y, p)[0])
    return out


def cutoffs(p: np.ndarray) -> np.ndarray:
    """Every distinct way to cut the scores: midpoints between distinct scores, plus one below and one above."""
    u = np.unique(np.asarray(p, float))
    if len(u) == 0:
        return np.array([0.5])
    return np.concatenate([[u[0] / 2 if u[0] > 0 else 0.0], (u[:-1] + u[1:]) / 2, [min(1.0, (u[-1] + 1) / 2)]])


def roc_points(y: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(false positive rate, true positive rate) from the strictest cut-off (nothing positive, (0, 0)) down to the
    lowest score (everything positive, (1, 1))."""
    thr = np.concatenate([[np.inf], np.unique(np.asarray(p, float))[::-1]])
    c = confusion(y, p, thr)
    with np.errstate(invalid="ignore", divide="ignore"):
        return c.fp[0] / np.maximum(c.fp[0] + c.tn[0], 1e-12), c.tp[0] / np.maximum(c.tp[0] + c.fn[0], 1e-12)
