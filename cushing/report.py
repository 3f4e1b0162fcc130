"""The evaluation of a predictions table: metrics with intervals, per-sex table, calibration, sex gaps.

Used for training runs, pooled cross-validation and external validation alike, so every report has the same
names. The operating threshold is given (chosen on validation elsewhere); nothing here chooses anything.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import pandas as pd

from . import evidence
from .metrics import MetricRow, metric_name, per_sex_table, rows_to_metrics, summarize

__all__ = ["Report", "build_report"]


@dataclass
class Report:
    metrics: dict[str, float]
    rows: list[MetricRow]
    per_sex: pd.DataFrame
    tags: dict[str, str]
    reliability: dict[str, pd.DataFrame] = field(default_factory=dict)


def build_report(pred: pd.DataFrame, *, threshold: float, splits: tuple[str, ...] = ("val", "test"),
                 min_positives: int = 5, bootstrap: int = 2000, seed: int = 0, prevalence: float | None = None,
                 argmax_split: str | None = "test") -> Report:
    rows: list[MetricRow] = []
    metrics: dict[str, float] = {"threshold": float(threshold)}
    tags: dict[str, str] = {}
    gap_reasons: dict[str, str] = {}
    reliability = {}
    present = [s for s in splits if (pred["split"] == s).any()]
    for split in present:
        part = pred[pred["split"] == split]
        # one bootstrap per split serves the F1/AUC intervals and the sex-gap intervals
        boot = evidence.bootstrap_metrics(part, threshold=threshold, n_boot=bootstrap, seed=seed)
        split_rows = summarize(pred, split=split, threshold=threshold, min_positives=min_positives, boot=boot)
        rows += split_rows
        y, p = part["label"].to_numpy(), part["probability"].to_numpy()
        metrics[f"{split}/brier"] = evidence.brier(y, p)
        metrics[f"{split}/ece"] = evidence.ece(y, p)
        reliability[split] = evidence.reliability(y, p)
        metrics.update(_gaps(part, split, threshold, boot, min_positives, gap_reasons))
        if prevalence is not None:
            sens = next(r.value for r in split_rows if r.group == "overall" and r.metric == "recall")
            spec = next(r.value for r in split_rows if r.group == "overall" and r.metric == "specificity")
            ppv, npv = evidence.ppv_npv(sens, spec, prevalence)
            metrics[f"{split}/ppv"], metrics[f"{split}/npv"] = ppv, npv
    if argmax_split in present and not math.isclose(threshold, 0.5):
        rows += summarize(pred, split=argmax_split, threshold=0.5, min_positives=min_positives,
                          label=f"{argmax_split}_argmax")
    elif argmax_split in present:  # the chosen threshold is argmax: the same numbers under the paper's name
        rows += [MetricRow(**{**r.__dict__, "split": f"{argmax_split}_argmax"}) for r in rows if r.split == argmax_split]
    metrics.update(rows_to_metrics(rows))
    metrics.update(_counts(rows))
    if prevalence is not None:
        metrics["prevalence"] = float(prevalence)
    summary = _not_estimable_summary(rows, min_positives) + [f"{k}: {v}" for k, v in gap_reasons.items()]
    if summary:
        tags["not_estimable"] = "; ".join(summary)
    return Report(metrics, rows, per_sex_table(rows), tags, reliability)


def _counts(rows: list[MetricRow]) -> dict[str, float]:
    """Images and positives per split and subgroup (`test/positives/male`): finite numbers the MLflow UI shows,
    which explain a not-estimable (NaN, hidden by the UI) subgroup metric beside it."""
    out = {}
    for r in rows:
        if r.metric == "accuracy" and not r.split.endswith("_argmax"):
            out[metric_name(r.split, "n", r.group)] = float(r.n)
            out[metric_name(r.split, "positives", r.group)] = float(r.positives)
    return out


def _not_estimable_summary(rows: list[MetricRow], min_positives: int) -> list[str]:
    """One readable line per split x subgroup: which metrics are not estimable and why."""
    lines = []
    by_group: dict[tuple[str, str], list[MetricRow]] = {}
    for r in rows:
        if not r.estimable:
            by_group.setdefault((r.split, r.group), []).append(r)
    for (split, group), rs in by_group.items():
        names = ", ".join(r.metric for r in rs)
        pos = rs[0].positives
        why = (f"{pos} positives < min_positives={min_positives}" if group != "overall" and pos < min_positives
               else "undefined: no positives, no negatives or no predicted positives")
        lines.append(f"{split}/{group}: {names} ({why})")
    return lines


def _gaps(part: pd.DataFrame, split: str, threshold: float, boot: dict, min_positives: int,
          reasons: dict[str, str]) -> dict[str, float]:
    out = {}
    for metric, (gap, lo, hi, est) in evidence.sex_gaps(part, threshold, boot, min_positives).items():
        name = f"{split}/{metric}/sex_gap"
        out[name] = gap
        if est and math.isfinite(lo):
            out[f"{name}/ci_low"], out[f"{name}/ci_high"] = lo, hi
        if not est:
            reasons[name] = f"a sex has fewer than min_positives={min_positives} positives"
    return out
