"""What a cohort of this size can show, before training: precision-based sample sizes for diagnostic accuracy,
counted in subjects. Buderer (1996) for sensitivity and specificity (normal approximation: width 2 z
sqrt(p (1 - p) / n)); Hanley & McNeil (1982) for the standard error of an AUC."""
from __future__ import annotations

import math

import pandas as pd

from cushing.stats.intervals import Z95

__all__ = ["proportion_width", "proportion_needed", "auc_width", "auc_needed", "auc_controls", "plan", "known_to"]


def proportion_width(p: float, n: int) -> float:
    """Expected 95% interval width (upper - lower) of a proportion p measured on n subjects."""
    return 2 * Z95 * math.sqrt(p * (1 - p) / n) if n > 0 else math.nan


def proportion_needed(p: float, width: float) -> int:
    """Buderer: the subjects (patients for sensitivity, controls for specificity) a 95% width of `width` needs."""
    return math.ceil(Z95 ** 2 * p * (1 - p) / (width / 2) ** 2)


def _auc_terms(a: float) -> tuple[float, float, float]:
    q1, q2 = a / (2 - a), 2 * a * a / (1 + a)
    return a * (1 - a), q1 - a * a, q2 - a * a


def auc_width(a: float, patients: int, controls: int) -> float:
    """Expected 95% width of an AUC of `a` (Hanley & McNeil's standard error)."""
    if patients < 1 or controls < 1:
        return math.nan
    v, b, c = _auc_terms(a)
    return 2 * Z95 * math.sqrt((v + (patients - 1) * b + (controls - 1) * c) / (patients * controls))


def auc_needed(a: float, width: float, ratio: float) -> int:
    """Patients, at `ratio` controls per patient, for a 95% AUC width of `width`: the positive root of
    ratio h^2 n^2 - (b + ratio c) n - (v - b - c) = 0, h = width / (2 z)."""
    v, b, c = _auc_terms(a)
    qa, qb, qc = ratio * (width / (2 * Z95)) ** 2, b + ratio * c, v - b - c
    return max(1, math.ceil((qb + math.sqrt(qb * qb + 4 * qa * qc)) / (2 * qa))) if ratio > 0 else 0


def auc_controls(a: float, width: float, patients: int) -> int:
    """Controls that, beside `patients`, give a 95% AUC width of `width` (0 when no number can)."""
    v, b, c = _auc_terms(a)
    h2 = (width / (2 * Z95)) ** 2
    return max(1, math.ceil((v + (patients - 1) * b - c) / (h2 * patients - c))) if h2 * patients > c else 0


def _check(sensitivity: float, specificity: float, auc: float, width: float) -> None:
    for name, v in (("sensitivity", sensitivity), ("specificity", specificity), ("auc", auc)):
        if not 0 < v < 1:
            raise ValueError(f"{name} must be strictly between 0 and 1, got {v:g}")
    if not 0 < width <= 1:
        raise ValueError(f"width (of the 95% interval, upper - lower) must be in (0, 1], got {width:g}")


def plan(subjects: pd.DataFrame, *, test_fraction: float, sensitivity: float = 0.85, specificity: float = 0.9,
         auc: float = 0.9, width: float = 0.2, columns: tuple[str, ...] = ("sex",)) -> pd.DataFrame:
    """Per group (overall, then each value of `columns`; `subjects`: one row per subject): test patients and
    controls, expected 95% widths, and the patients (for recall, and the AUC at the group's control:patient ratio),
    then controls (for specificity, and the AUC beside them) the test split and cohort need for `width`."""
    _check(sensitivity, specificity, auc, width)
    if not (subjects["label"] == 1).any():
        raise ValueError("the cohort has no patients (label 1): there is nothing to estimate recall or AUC from")
    test = subjects[subjects["split"] == "test"]
    groups = [("overall", test)] + [(f"{c}:{v}" if c != "sex" else {"F": "female", "M": "male"}.get(v, v),
                                     test[test[c].astype(str) == v])
                                    for c in columns for v in sorted(subjects[c].astype(str).unique())]
    rows = []
    for name, g in groups:
        pos, neg = int(g["label"].sum()), int((g["label"] == 0).sum())
        ratio = neg / pos if pos else float(len(subjects) - subjects["label"].sum()) / subjects["label"].sum()
        need_p = max(proportion_needed(sensitivity, width), auc_needed(auc, width, ratio))
        need_n = max(proportion_needed(specificity, width), auc_controls(auc, width, need_p))
        rows.append({"group": name, "test_patients": pos, "test_controls": neg,
                     "recall_width": proportion_width(sensitivity, pos),
                     "specificity_width": proportion_width(specificity, neg), "auc_width": auc_width(auc, pos, neg),
                     "patients_needed": need_p, "controls_needed": need_n,
                     "cohort_patients_needed": math.ceil(need_p / test_fraction),
                     "cohort_controls_needed": math.ceil(need_n / test_fraction)})
    return pd.DataFrame(rows)


def known_to(patients: dict[str, int], sensitivity: float = 0.85) -> str:
    """One line for a model card or an audit summary: how well recall is known with these test patients per
    group (e.g. {"female": 12, "male": 4})."""
    parts = [(n, g, proportion_width(sensitivity, n) / 2) for g, n in patients.items()] or [(0, "", math.nan)]
    return ("with " + " and ".join(f"{n} {g}".strip() for n, g, _ in parts) + " patients in test, recall is known to "
            "about " + " and ".join(f"±{h:.2f}" if math.isfinite(h) else "nothing" for *_, h in parts)
            + f" (95% interval half-width at a recall of {sensitivity:g}; Buderer 1996)")
