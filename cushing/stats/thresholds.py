"""The operating threshold, chosen on validation only: a rule (F1, Youden, a target sensitivity or specificity, a
guaranteed one, a fixed number) scored over every cut-off of the validation scores.

`sensitivity_lcb:X` promises recall: the highest cut-off whose validation recall has a subject-level 95% lower
bound (the logged `val/recall/ci_low`, same method and resamples) of at least X; `specificity_lcb:X` the lowest
cut-off with the same for specificity. When no cut-off can promise it the threshold falls back to the plain rule
(`sensitivity:X`) and the operating point says so, with the validation subjects a guarantee would need."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from cushing.stats.intervals import Z95, resample_weights, subject_wilson
from cushing.stats.metrics import confusion, cutoffs, rates

if TYPE_CHECKING:  # the config parses rules: no pandas for `cushing --help`
    import pandas as pd

__all__ = ["ThresholdRule", "parse_threshold_rule", "choose_threshold", "OperatingPoint", "operating_point",
           "subjects_needed", "unattainable"]
TARGETS = ("sensitivity_lcb", "specificity_lcb", "sensitivity", "specificity")


@dataclass(frozen=True)
class ThresholdRule:
    kind: str  # f1 | youden | sensitivity | specificity | sensitivity_lcb | specificity_lcb | fixed
    value: float = float("nan")

    def __str__(self) -> str:
        return self.kind if self.kind in ("f1", "youden") else (
            f"{self.kind}:{self.value:g}" if self.kind in TARGETS else f"{self.value:g}")

    @property
    def metric(self) -> str:
        return "recall" if self.kind.startswith("sensitivity") else "specificity"


def parse_threshold_rule(text: str) -> ThresholdRule:
    t = str(text).strip().lower().replace("recall", "sensitivity")
    if t in ("f1", "youden"):
        return ThresholdRule(t)
    if t in ("argmax", "0.5"):
        return ThresholdRule("fixed", 0.5)
    kind, _, value = t.partition(":")
    if kind in TARGETS:
        try:
            v = float(value)
        except ValueError:
            raise ValueError(f"{kind}:X needs a number X, got {text!r}") from None
        if not (0 < v < 1 or (v == 1 and not kind.endswith("_lcb"))):
            raise ValueError(f"target {kind} must be in (0, 1{')' if kind.endswith('_lcb') else ']'}, got {v}")
        return ThresholdRule(kind, v)
    try:
        v = float(t)
    except ValueError:
        raise ValueError(f"expected f1, youden, sensitivity:X, specificity:X, sensitivity_lcb:X, specificity_lcb:X "
                         f"or a number in (0, 1), got {text!r}") from None
    if not 0 < v < 1:
        raise ValueError(f"a fixed threshold must be in (0, 1), got {v}")
    return ThresholdRule("fixed", v)


@dataclass(frozen=True)
class OperatingPoint:
    """The chosen threshold and, for a guaranteed rule, what it promises: `statement` says it in words."""

    threshold: float
    rule: str
    lower_bound: float = math.nan  # the subject-level 95% lower bound at the threshold (guaranteed rules)
    met: bool = True
    statement: str = ""


def subjects_needed(target: float, rate: float) -> int:
    """The fewest subjects whose Wilson 95% lower bound reaches `target` at an observed `rate` (0 if none can):
    z^2 target (1 - target) / (rate - target)^2, from the Wilson interval's defining inequality."""
    return math.ceil(Z95 ** 2 * target * (1 - target) / (rate - target) ** 2) if rate > target else 0


def unattainable(rule: ThresholdRule | str, patients: int, controls: int) -> str | None:
    """Why a guaranteed rule cannot be met by any model on this validation split (even a perfect rate's lower
    bound falls short), or None: known before training, so a run can refuse before it trains."""
    rule = parse_threshold_rule(rule) if isinstance(rule, str) else rule
    n, who = (patients, "patients") if rule.metric == "recall" else (controls, "controls")
    if not rule.kind.endswith("_lcb") or n >= (need := subjects_needed(rule.value, 1.0)):
        return None
    return (f"threshold={rule} cannot be promised: the validation split has {n} {who} (subjects), and even with "
            f"every one classified right the 95% lower bound of {rule.metric} is {n / (n + Z95 ** 2):.3f}; a lower "
            f"bound of {rule.value:g} needs at least {need} validation {who} (more if the model errs). Enlarge the "
            f"validation split (split_ratios) or the cohort, lower the target, or use {rule.kind[:-4]}:{rule.value:g}"
            " (no guarantee)")


def _scores(y: np.ndarray, p: np.ndarray, cuts: np.ndarray, rule: ThresholdRule) -> np.ndarray:
    c = confusion(y, p, cuts)
    tp, fp, fn, tn = c.tp[0], c.fp[0], c.fn[0], c.tn[0]
    tpr, fpr = tp / (tp + fn), fp / (fp + tn)
    if rule.kind == "f1":
        return 2 * tp / np.maximum(2 * tp + fp + fn, 1)
    if rule.kind == "youden":
        return tpr - fpr
    if rule.metric == "recall":  # highest specificity with sensitivity >= target
        return np.where(tpr >= rule.value - 1e-12, 1 - fpr, -np.inf)
    return np.where(1 - fpr >= rule.value - 1e-12, tpr, -np.inf)  # highest sensitivity with specificity >= target


def choose_threshold(y_val: np.ndarray, p_val: np.ndarray, rule: ThresholdRule | str) -> float:
    """The operating threshold, from validation labels and scores only (each photo its own subject)."""
    return operating_point({"subject": np.arange(len(y_val)), "label": y_val, "probability": p_val}, rule).threshold


def operating_point(val: pd.DataFrame | dict, rule: ThresholdRule | str, *, n_boot: int = 0, seed: int = 0,
                    repeats: bool | None = None) -> OperatingPoint:
    """The operating point from a validation predictions table (subject, sex, label, probability), every cut-off
    scored at once; a guaranteed rule's lower bounds use the report's resamples (`n_boot`, `seed`) when `repeats`
    (`photos_repeat` of the whole predictions table, as the report decides; None: of validation alone), else
    Wilson, so the bound is the run's own `val/recall/ci_low`."""
    rule = parse_threshold_rule(rule) if isinstance(rule, str) else rule
    if rule.kind == "fixed":
        return OperatingPoint(float(rule.value), str(rule))
    y, p = np.asarray(val["label"]).astype(bool), np.asarray(val["probability"], float)
    if y.sum() == 0 or (~y).sum() == 0:  # nothing to choose with; argmax is the honest default
        lcb = rule.kind.endswith("_lcb")
        return OperatingPoint(0.5, str(rule), met=not lcb, statement="NOT MET: validation holds one class only; "
                              "threshold 0.5 (argmax), no guarantee" if lcb else "")
    cuts = cutoffs(p)
    score = _scores(y, p, cuts, ThresholdRule(rule.kind.removesuffix("_lcb"), rule.value))
    best = np.flatnonzero(score == score.max())  # among ties the threshold closest to 0.5 (least extreme)
    fallback = float(cuts[best[np.argmin(np.abs(cuts[best] - 0.5))]])
    if not rule.kind.endswith("_lcb"):
        return OperatingPoint(fallback, str(rule))
    return _guaranteed(val, y, p, cuts, rule, fallback, n_boot, seed, repeats)


def _guaranteed(val: pd.DataFrame, y: np.ndarray, p: np.ndarray, cuts: np.ndarray, rule: ThresholdRule,
                fallback: float, n_boot: int, seed: int, repeats: bool | None) -> OperatingPoint:
    m, target = rule.metric, rule.value
    other, who = ("specificity", "patients") if m == "recall" else ("recall", "controls")
    every = rates(confusion(y, p, cuts))
    point = every[m][0]
    cand = np.flatnonzero(point >= target)  # a lower bound never exceeds its point estimate
    subjects = np.asarray(val["subject"])
    n = len(np.unique(subjects[y if m == "recall" else ~y]))
    repeats = len(np.unique(subjects)) < len(subjects) if repeats is None else repeats
    resampled = rates(confusion(y, p, cuts[cand], resample_weights(val, n_boot, seed)))[m] \
        if n_boot > 0 and repeats else None  # several photos of a subject: the subject bootstrap
    low = subject_wilson(point[cand], resampled, n)[0]
    ok = cand[low >= target]
    if len(ok):
        i = ok.max() if m == "recall" else ok.min()
        lb = float(low[cand == i][0])
        return OperatingPoint(float(cuts[i]), str(rule), lb, True,
                              f"validation {m} {point[i]:.3f}, 95% lower bound {lb:.3f} >= {target:g} "
                              f"({n} validation {who}): guaranteed, at validation {other} {every[other][0, i]:.3f}")
    rate = float(point[np.searchsorted(cuts, fallback)])  # only without the check before training (`unattainable`)
    return OperatingPoint(fallback, str(rule), float(np.max(low, initial=0.0)), False,
                          f"NOT MET: no cut-off's validation {m} has a 95% lower bound of {target:g} ({n} validation "
                          f"{who}); threshold falls back to {rule.kind[:-4]}:{target:g} (validation {m} {rate:.3f}, no "
                          f"guarantee), where one needs about {subjects_needed(target, rate) or 'no number of'} {who}")
