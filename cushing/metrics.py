"""One metric vocabulary, computed from one predictions table.

A predictions table has columns subject (hashed id), split, sex (F/M), label (0/1), probability. Every number
the project reports overall or per sex comes from `summarize` applied to such a table.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

__all__ = ["METRICS", "PROPORTIONS", "GROUPS", "point_metrics", "auc_score", "summarize", "MetricRow",
           "rows_to_metrics", "per_sex_table", "metric_name", "GATED", "lower_is_better"]

METRICS = ("accuracy", "precision", "recall", "specificity", "f1", "auc")


def lower_is_better(name: str) -> bool:
    """Direction of a logged metric (best-epoch selection, study objectives, promotion): losses, Brier score and
    calibration error go down, everything else up."""
    return name.endswith(("loss", "brier", "ece"))
PROPORTIONS = ("accuracy", "precision", "recall", "specificity")  # Wilson intervals
GATED = ("precision", "recall", "f1", "auc")  # need enough positives to mean anything
GROUPS = {"overall": None, "female": "F", "male": "M"}


def metric_name(split: str, metric: str, group: str = "overall") -> str:
    return f"{split}/{metric}" if group == "overall" else f"{split}/{metric}/{group}"


def auc_score(y: np.ndarray, p: np.ndarray) -> float:
    """ROC AUC by the Mann-Whitney rank statistic; NaN unless both classes are present."""
    from scipy.stats import rankdata

    y = np.asarray(y).astype(bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(p)
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _ratio(a: float, b: float) -> float:
    return float(a / b) if b > 0 else float("nan")


def counts(y: np.ndarray, p: np.ndarray, threshold: float) -> dict[str, int]:
    y = np.asarray(y).astype(bool)
    pred = np.asarray(p) >= threshold
    return {"tp": int((pred & y).sum()), "fp": int((pred & ~y).sum()), "tn": int((~pred & ~y).sum()),
            "fn": int((~pred & y).sum())}


def point_metrics(y: np.ndarray, p: np.ndarray, threshold: float = 0.5) -> dict[str, float]:
    """accuracy, precision, recall, specificity, f1, auc; NaN where undefined (never a fake 0)."""
    c = counts(y, p, threshold)
    tp, fp, tn, fn = c["tp"], c["fp"], c["tn"], c["fn"]
    n = tp + fp + tn + fn
    return {
        "accuracy": _ratio(tp + tn, n),
        "precision": _ratio(tp, tp + fp),
        "recall": _ratio(tp, tp + fn),
        "specificity": _ratio(tn, tn + fp),
        "f1": _ratio(2 * tp, 2 * tp + fp + fn) if tp + fn > 0 else float("nan"),
        "auc": auc_score(y, p),
    }


@dataclass(frozen=True)
class MetricRow:
    split: str
    group: str  # overall | female | male
    metric: str
    value: float
    ci_low: float = float("nan")
    ci_high: float = float("nan")
    n: int = 0
    positives: int = 0
    estimable: bool = True
    threshold: float = 0.5

    @property
    def name(self) -> str:
        return metric_name(self.split, self.metric, self.group)


def summarize(pred: pd.DataFrame, *, split: str, threshold: float, min_positives: int = 0,
              boot: dict[tuple[str, str], tuple[float, float]] | None = None, label: str | None = None
              ) -> list[MetricRow]:
    """Every metric for one split, overall and per sex; F1/AUC intervals from `boot` (evidence.bootstrap_metrics
    of this split) when given, Wilson intervals for proportions always.

    `label` renames the split in metric names (e.g. test_argmax) without changing which rows are used.
    A sex subgroup with fewer than `min_positives` positives gets NaN for the positive-dependent metrics and
    `estimable=False`; a subgroup with no positives or no negatives gets NaN where the metric is undefined.
    """
    part = pred[pred["split"] == split]
    name = label or split
    boot = boot or {}
    rows = []
    for group, sex in GROUPS.items():
        sub = part if sex is None else part[part["sex"] == sex]
        y, p = sub["label"].to_numpy(), sub["probability"].to_numpy()
        pos = int(y.sum())
        values = point_metrics(y, p, threshold) if len(sub) else {m: float("nan") for m in METRICS}
        c = counts(y, p, threshold)
        gated = sex is not None and pos < min_positives
        for m in METRICS:
            lo, hi = _interval(m, c, boot.get((group, m)))
            est = not (gated and m in GATED)
            v = values[m] if est else float("nan")
            rows.append(MetricRow(name, group, m, v, lo if est else math.nan, hi if est else math.nan,
                                  len(sub), pos, est and not math.isnan(v), threshold))
    return rows


def _interval(metric: str, c: dict[str, int], boot: tuple[float, float] | None) -> tuple[float, float]:
    from . import evidence

    if metric in PROPORTIONS:
        k, n = {"accuracy": (c["tp"] + c["tn"], sum(c.values())), "precision": (c["tp"], c["tp"] + c["fp"]),
                "recall": (c["tp"], c["tp"] + c["fn"]), "specificity": (c["tn"], c["tn"] + c["fp"])}[metric]
        return evidence.wilson(k, n)
    return boot if boot is not None else (float("nan"), float("nan"))


def rows_to_metrics(rows: list[MetricRow], intervals: bool = True) -> dict[str, float]:
    """MLflow metric dict: name, name/ci_low, name/ci_high."""
    out: dict[str, float] = {}
    for r in rows:
        out[r.name] = r.value
        if intervals and not (math.isnan(r.ci_low) and math.isnan(r.ci_high)):
            out[f"{r.name}/ci_low"] = r.ci_low
            out[f"{r.name}/ci_high"] = r.ci_high
    return out


def not_estimable(rows: list[MetricRow]) -> list[str]:
    return [r.name for r in rows if not r.estimable]


def per_sex_table(rows: list[MetricRow]) -> pd.DataFrame:
    """Rows like the paper's Table III: one per split x group, metric columns with intervals."""
    recs: dict[tuple[str, str], dict] = {}
    for r in rows:
        rec = recs.setdefault((r.split, r.group), {"split": r.split, "group": r.group, "n": r.n,
                                                   "positives": r.positives, "threshold": round(r.threshold, 6)})
        if not r.estimable and math.isnan(r.value):
            rec[r.metric] = "not estimable"
        else:
            rec[r.metric] = r.value
        rec[f"{r.metric}_ci_low"] = r.ci_low
        rec[f"{r.metric}_ci_high"] = r.ci_high
    return pd.DataFrame(list(recs.values()))
