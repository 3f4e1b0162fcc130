"""The operating threshold, chosen on validation only: a rule (F1, Youden, a target sensitivity, a fixed
number) scored over every cut-off of the validation scores with the one confusion-count implementation."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cushing.stats.metrics import confusion, cutoffs

__all__ = ["ThresholdRule", "parse_threshold_rule", "choose_threshold"]


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


def choose_threshold(y_val: np.ndarray, p_val: np.ndarray, rule: ThresholdRule | str) -> float:
    """The operating threshold, from validation labels and scores only (every cut-off scored at once)."""
    rule = parse_threshold_rule(rule) if isinstance(rule, str) else rule
    if rule.kind == "fixed":
        return float(rule.value)
    y = np.asarray(y_val).astype(bool)
    p = np.asarray(p_val, float)
    if y.sum() == 0 or (~y).sum() == 0:
        return 0.5  # nothing to choose with; argmax is the honest default
    cuts = cutoffs(p)
    c = confusion(y, p, cuts)
    tp, fp, fn, tn = c.tp[0], c.fp[0], c.fn[0], c.tn[0]
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
