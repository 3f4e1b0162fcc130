"""Intervals that keep small-n numbers honest, counting subjects rather than photos: Wilson for proportions (at
the subject bootstrap's effective sample size where a subject has several photos), a subject-level stratified
bootstrap for F1, AUC and subgroup gaps. Built on `metrics` (the one metric implementation)."""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from cushing.stats.metrics import PROPORTIONS, auc, confusion, rates
from cushing.stats.subgroups import Subgroup

if TYPE_CHECKING:  # pandas is not imported for `cushing --help` (the config validates threshold rules)
    import pandas as pd

__all__ = ["wilson", "photos_repeat", "subject_weights", "resample_weights", "subject_wilson", "bootstrap", "Gap",
           "percentile_interval", "Z95"]

Z95 = 1.959963984540054


def wilson(k, n, z: float = Z95):
    """Wilson score interval for k successes in n trials (arrays, or floats for scalars); NaN where n == 0."""
    k, n = np.asarray(k, float), np.asarray(n, float)
    with np.errstate(invalid="ignore", divide="ignore"):
        ph = k / n
        denom = 1 + z * z / n
        centre = (ph + z * z / (2 * n)) / denom
        half = z * np.sqrt(np.maximum(ph * (1 - ph), 0) / n + z * z / (4 * n * n)) / denom
    lo = np.where(n > 0, np.where(k <= 0, 0.0, np.maximum(0.0, centre - half)), np.nan)
    hi = np.where(n > 0, np.where(k >= n, 1.0, np.minimum(1.0, centre + half)), np.nan)
    return (float(lo), float(hi)) if lo.ndim == 0 else (lo, hi)


def subject_wilson(point, resampled: np.ndarray | None, n_subjects):
    """Wilson for a proportion of photos clustered in subjects, at the effective sample size whose binomial
    variance is the subject bootstrap's (`resampled`: [B] or [B, cut-offs]; Korn & Graubard 1998), never more than
    one per subject: never narrower than Wilson with each subject counted once, wider where a subject's photos
    weigh more. Without resamples (or at 0 or 1, where they do not vary) each subject counts once."""
    point = np.asarray(point, float)
    n = np.broadcast_to(np.asarray(n_subjects, float), point.shape)
    if resampled is not None:
        with warnings.catch_warnings(), np.errstate(invalid="ignore", divide="ignore"):
            warnings.simplefilter("ignore", RuntimeWarning)  # a column of NaN resamples (no denominator)
            var = np.nanvar(resampled, axis=0)
            n = np.where(var > 0, np.minimum(n, point * (1 - point) / var), n)
    return wilson(point * n, n)


def subject_weights(subjects: np.ndarray, strata: np.ndarray, n_boot: int, seed: int) -> np.ndarray:
    """[B, n_images] weights: how often each image's subject was drawn in each resample. Subjects are drawn with
    replacement within strata (label x sex), so a subject's images travel together and stratum sizes are kept."""
    rng = np.random.default_rng(seed)
    uniq, first, inv = np.unique(subjects, return_index=True, return_inverse=True)
    subj_stratum = np.asarray(strata)[first]
    rows = np.arange(n_boot)[:, None] * len(uniq)  # resample b counts in cells b*n_subjects + subject
    counts = np.zeros(n_boot * len(uniq), dtype=np.int64)
    for s in np.unique(subj_stratum):
        members = np.flatnonzero(subj_stratum == s)
        picks = rng.integers(0, len(members), size=(n_boot, len(members)))  # the same draws, stratum by stratum
        counts += np.bincount((rows + members[picks]).ravel(), minlength=len(counts))
    return counts.reshape(n_boot, len(uniq)).astype(np.float64)[:, inv]


def photos_repeat(pred: pd.DataFrame) -> bool:
    """Some subject has several photos somewhere in a predictions table: then the proportions' intervals come from the
    subject bootstrap, not Wilson, in every split alike (the report's and the guaranteed threshold's)."""
    return bool(pred["subject"].duplicated().any())


def resample_weights(part: pd.DataFrame, n_boot: int, seed: int) -> np.ndarray:
    """The subject resamples of a predictions table (`subject_weights` within label x sex strata): [B, rows]."""
    strata = part["sex"].astype(str).to_numpy() if "sex" in part.columns else np.zeros(len(part), str)
    subj_label = part.groupby("subject")["label"].transform("max").to_numpy()
    return subject_weights(part["subject"].to_numpy(), np.char.add(strata, subj_label.astype(str)), n_boot, seed)


def percentile_interval(v: np.ndarray) -> tuple[float, float]:
    """95% percentile interval of finite bootstrap values (NaN with fewer than 10)."""
    v = v[np.isfinite(v)]
    lo, hi = np.percentile(v, [2.5, 97.5]) if len(v) >= 10 else (np.nan, np.nan)
    return (float(lo), float(hi))


@dataclass(frozen=True)
class Gap:
    """A disparity between subgroups: `difference` = first - second (the signed sex gap, female - male);
    `range` = best - worst of the members (any other column)."""

    name: str  # e.g. sex_gap, gap:site
    members: tuple[str, ...]  # subgroup names
    kind: str = "range"


def _gap_values(per_group: dict[str, dict[str, np.ndarray]], gap: Gap, metric: str) -> np.ndarray | None:
    vals = [per_group[m][metric] for m in gap.members if m in per_group]
    if len(vals) < 2:
        return None
    if gap.kind == "difference":
        return vals[0] - vals[1]
    stacked = np.vstack(vals)
    with np.errstate(invalid="ignore"):
        ok = np.isfinite(stacked).sum(0) >= 2
        return np.where(ok, np.nanmax(stacked, 0) - np.nanmin(stacked, 0), np.nan)


def bootstrap(part: pd.DataFrame, groups: list[Subgroup], *, threshold: float, n_boot: int = 2000, seed: int = 0,
              metrics: tuple[str, ...] = ("f1", "auc"), gaps: tuple[Gap, ...] = (),
              gap_metrics: tuple[str, ...] = ("recall", "specificity", "f1")
              ) -> dict[tuple[str, str], tuple[float, float]]:
    """(subgroup or gap name, metric) -> 95% interval, from one set of subject resamples (within label x sex
    strata) shared by every subgroup and gap of this split: the percentile interval, and for a proportion in
    `metrics` (accuracy, precision, recall, specificity) `subject_wilson`."""
    if part.empty or n_boot <= 0:
        return {}
    y, p = part["label"].to_numpy(), part["probability"].to_numpy().astype(float)
    w = resample_weights(part, n_boot, seed)
    out: dict[tuple[str, str], tuple[float, float]] = {}
    per_group = {}
    for g in groups:
        mask = g.mask(part)
        if not mask.any():
            continue
        r = {k: v[:, 0] for k, v in rates(confusion(y[mask], p[mask], threshold, w[:, mask])).items()}
        r = per_group[g.name] = {**r, "auc": auc(y[mask], p[mask], w[:, mask])}
        point = rates(confusion(y[mask], p[mask], threshold))
        for m in metrics:
            out[(g.name, m)] = percentile_interval(r[m]) if m not in PROPORTIONS else \
                subject_wilson(point[m][0, 0], r[m], _subjects_behind(part[mask], m, threshold))
    for gap in gaps:
        for m in gap_metrics:
            v = _gap_values(per_group, gap, m)
            if v is not None:
                out[(gap.name, m)] = percentile_interval(v)
    return out


def _subjects_behind(part: pd.DataFrame, metric: str, threshold: float) -> int:
    """The subjects in a proportion's denominator (all, predicted positive, patients, controls)."""
    rows = {"accuracy": np.ones(len(part), bool), "precision": part["probability"].to_numpy() >= threshold,
            "recall": part["label"].to_numpy() == 1, "specificity": part["label"].to_numpy() == 0}[metric]
    return part["subject"][rows].nunique()
