"""The evaluation of a predictions table (columns subject (hashed id), split, sex (F/M), label (0/1), probability
and any `subgroup_columns`): metrics with intervals overall and per subgroup, subgroup gaps, calibration, the counts
that explain what is not estimable. The same names for training runs, pooled cross-validation and external
validation; the operating threshold is given (chosen on validation elsewhere): nothing here chooses anything."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from cushing.stats.calibration import brier, ece, ppv_npv, reliability
from cushing.stats.decision import THRESHOLDS, decision_curve
from cushing.stats.intervals import Gap, bootstrap as bootstrap_intervals, photos_repeat, wilson
from cushing.stats.metrics import GAP_METRICS, GATED, METRICS, PROPORTIONS, Counts, confusion, point_metrics
from cushing.stats.subgroups import Subgroup, gap_name, subgroups_of

__all__ = ["MetricRow", "Report", "build_report", "summarize", "rows_to_metrics", "per_sex_table",
           "per_subgroup_table", "metric_name", "shown", "interval_of"]


def metric_name(split: str, metric: str, group: str = "overall") -> str:
    return f"{split}/{metric}" if group == "overall" else f"{split}/{metric}/{group}"


@dataclass(frozen=True)
class MetricRow:
    split: str
    group: str  # subgroup name: overall | female | male | <column>:<value>
    metric: str
    value: float
    ci_low: float = float("nan")
    ci_high: float = float("nan")
    n: int = 0  # photos
    positives: int = 0  # photos of patients
    patients: int = 0  # distinct patients (subjects): what min_positives counts
    estimable: bool = True
    threshold: float = 0.5
    column: str = ""  # the subgroup's manifest column ("" for overall)

    @property
    def name(self) -> str:
        return metric_name(self.split, self.metric, self.group)


def _interval(metric: str, c: Counts, boot: tuple[float, float] | None) -> tuple[float, float]:
    if metric in PROPORTIONS and boot is None:  # one photo per subject: Wilson from the counts
        tp, fp, fn, tn = (int(round(float(v[0, 0]))) for v in (c.tp, c.fp, c.fn, c.tn))
        k, n = {"accuracy": (tp + tn, tp + fp + fn + tn), "precision": (tp, tp + fp), "recall": (tp, tp + fn),
                "specificity": (tn, tn + fp)}[metric]
        return wilson(k, n)
    return boot if boot is not None else (float("nan"), float("nan"))


def summarize(pred: pd.DataFrame, *, split: str, threshold: float, groups: list[Subgroup] | None = None,
              min_positives: int = 0, boot: dict[tuple[str, str], tuple[float, float]] | None = None,
              label: str | None = None) -> list[MetricRow]:
    """Every metric for one split, overall and per subgroup (default: per sex); intervals from `boot` (this split's
    bootstrap) when given, else Wilson for the proportions. `label` renames the split in metric names (test_argmax).
    A subgroup with fewer than `min_positives` patients (subjects, however many photos each) gets NaN and
    `estimable=False` for the positive-dependent metrics; one with no positives or no negatives gets NaN where the
    metric is undefined."""
    part = pred[pred["split"] == split]
    groups = groups if groups is not None else subgroups_of(part, ("sex",))
    boot = boot or {}
    rows = []
    for g in groups:
        sub = part[g.mask(part)]
        y, p = sub["label"].to_numpy(), sub["probability"].to_numpy()
        pos, patients = int(y.sum()), _patients(sub)
        values = point_metrics(y, p, threshold) if len(sub) else {m: float("nan") for m in METRICS}
        c = confusion(y, p, threshold)
        gated = g.column is not None and patients < min_positives
        for m in METRICS:
            lo, hi = _interval(m, c, boot.get((g.name, m)))
            est = not (gated and m in GATED)
            v = values[m] if est else float("nan")
            rows.append(MetricRow(label or split, g.name, m, v, lo if est else math.nan, hi if est else math.nan,
                                  len(sub), pos, patients, est and not math.isnan(v), threshold, g.column or ""))
    return rows


def _patients(part: pd.DataFrame) -> int:
    return int(part.loc[part["label"] == 1, "subject"].nunique())


def rows_to_metrics(rows: list[MetricRow], intervals: bool = True) -> dict[str, float]:
    """MLflow metric dict: name, name/ci_low, name/ci_high."""
    out: dict[str, float] = {}
    for r in rows:
        out[r.name] = r.value
        if intervals and not (math.isnan(r.ci_low) and math.isnan(r.ci_high)):
            out[f"{r.name}/ci_low"], out[f"{r.name}/ci_high"] = r.ci_low, r.ci_high
    return out


def per_subgroup_table(rows: list[MetricRow]) -> pd.DataFrame:
    """One row per split x subgroup: metric columns with intervals, `not estimable` where a metric is not."""
    recs: dict[tuple[str, str], dict] = {}
    for r in rows:
        rec = recs.setdefault((r.split, r.group), dict(split=r.split, column=r.column or "all", group=r.group, n=r.n,
                                                       positives=r.positives, patients=r.patients,
                                                       threshold=round(r.threshold, 6)))
        rec[r.metric] = "not estimable" if not r.estimable and math.isnan(r.value) else r.value
        rec[f"{r.metric}_ci_low"], rec[f"{r.metric}_ci_high"] = r.ci_low, r.ci_high
    return pd.DataFrame(list(recs.values()))


def per_sex_table(rows: list[MetricRow]) -> pd.DataFrame:
    """Rows like the paper's Table III: overall, female and male per split."""
    table = per_subgroup_table([r for r in rows if r.column in ("", "sex")])
    return table.drop(columns="column") if not table.empty else table


@dataclass
class Report:
    metrics: dict[str, float]
    rows: list[MetricRow]
    per_sex: pd.DataFrame
    tags: dict[str, str]
    reliability: dict[str, pd.DataFrame] = field(default_factory=dict)
    per_subgroup: pd.DataFrame = field(default_factory=pd.DataFrame)
    decision_curve: pd.DataFrame = field(default_factory=pd.DataFrame)  # of the last split (test, external, oof)


def _gaps_for(groups: list[Subgroup], part: pd.DataFrame, min_positives: int) -> list[Gap]:
    """The sex gap (female - male) and, for every other column, the range over its subgroups that have enough
    patients to be estimated."""
    patients = {g.name: _patients(part[g.mask(part)]) for g in groups}
    gaps = []
    for col in dict.fromkeys(g.column for g in groups if g.column):
        names = [g.name for g in groups if g.column == col]
        if col != "sex":
            gaps.append(Gap(gap_name(col), tuple(n for n in names if patients.get(n, 0) >= min_positives)))
        elif {"female", "male"} <= set(names):
            gaps.append(Gap("sex_gap", ("female", "male"), "difference"))
    return gaps


def _gap_metrics(rows: list[MetricRow], split: str, gap: Gap, boot: dict, min_positives: int,
                 reasons: dict[str, str]) -> dict[str, float]:
    point = {(r.group, r.metric): (r.value, r.patients) for r in rows if r.split == split}
    out = {}
    for metric in GAP_METRICS:
        name = f"{split}/{metric}/{gap.name}"
        vals = [point.get((m, metric), (math.nan, 0)) for m in gap.members]
        if gap.kind == "difference":
            enough = min(v[1] for v in vals) >= min_positives or metric == "specificity"
            value = vals[0][0] - vals[1][0] if enough else math.nan
        else:
            finite = [v[0] for v in vals if math.isfinite(v[0])]
            value = max(finite) - min(finite) if len(finite) >= 2 else math.nan
        out[name] = value
        lo, hi = boot.get((gap.name, metric), (math.nan, math.nan))
        if math.isfinite(value) and math.isfinite(lo):
            out[f"{name}/ci_low"], out[f"{name}/ci_high"] = lo, hi
        if not math.isfinite(value):
            reasons[name] = ("a sex has fewer than min_positives={} patients" if gap.kind == "difference" else
                             "fewer than two subgroups with min_positives={} patients").format(min_positives)
    return out


def build_report(pred: pd.DataFrame, *, threshold: float, splits: tuple[str, ...] = ("val", "test"),
                 min_positives: int = 5, bootstrap: int = 2000, seed: int = 0, prevalence: float | None = None,
                 argmax_split: str | None = "test", subgroup_columns: tuple[str, ...] = ("sex",),
                 decision: bool = True) -> Report:
    """Metrics with intervals for each split; with `decision`, the decision curve of the last split (its scores
    must be probabilities: not pooled folds recentred on their thresholds) and its net benefit at `threshold`."""
    rows: list[MetricRow] = []
    metrics: dict[str, float] = {"threshold": float(threshold)}
    reasons: dict[str, str] = {}
    reliability_tables = {}
    groups = subgroups_of(pred, subgroup_columns)
    present = [s for s in splits if (pred["split"] == s).any()]
    # several photos of a subject: proportions too get their intervals from the subjects' bootstrap
    props = PROPORTIONS if bootstrap > 0 and photos_repeat(pred) else ()
    curve = pd.DataFrame()
    for split in present:
        part = pred[pred["split"] == split]
        gaps = _gaps_for(groups, part, min_positives)
        # one bootstrap per split serves every subgroup's intervals and every gap's interval
        boot = bootstrap_intervals(part, groups, threshold=threshold, n_boot=bootstrap, seed=seed, gaps=tuple(gaps),
                                   metrics=("f1", "auc", *props))
        split_rows = summarize(pred, split=split, threshold=threshold, groups=groups, min_positives=min_positives,
                               boot=boot)
        rows += split_rows
        y, p = part["label"].to_numpy(), part["probability"].to_numpy()
        metrics[f"{split}/brier"], metrics[f"{split}/ece"] = brier(y, p), ece(y, p)
        reliability_tables[split] = reliability(y, p)
        for gap in gaps:
            metrics.update(_gap_metrics(split_rows, split, gap, boot, min_positives, reasons))
        if prevalence is not None:
            metrics.update(_predictive_values(split, split_rows, prevalence))
        if decision and split == present[-1]:
            curve = decision_curve(part, np.append(THRESHOLDS, threshold), prevalence, bootstrap, seed)
            metrics.update(_net_benefit_at(split, curve.iloc[-1]))
            curve = curve.iloc[:-1]
    if argmax_split in present and not math.isclose(threshold, 0.5):  # test at 0.5 (the paper's argmax), test_argmax
        boot = bootstrap_intervals(pred[pred["split"] == argmax_split], groups, threshold=0.5, n_boot=bootstrap,
                                   seed=seed, metrics=props) if props else None
        rows += summarize(pred, split=argmax_split, threshold=0.5, groups=groups, min_positives=min_positives,
                          boot=boot, label=f"{argmax_split}_argmax")
    elif argmax_split in present:  # the chosen threshold is argmax: the same numbers under the paper's name
        rows += [MetricRow(**{**r.__dict__, "split": f"{argmax_split}_argmax"}) for r in rows
                 if r.split == argmax_split]
    metrics.update(rows_to_metrics(rows))
    metrics.update(_counts(rows))
    if prevalence is not None:
        metrics["prevalence"] = float(prevalence)
    summary = _not_estimable_summary(rows, min_positives) + [f"{k}: {v}" for k, v in reasons.items()]
    tags = {"not_estimable": _bounded("; ".join(summary))} if summary else {}
    tags["interval_method"] = "subject_bootstrap" if props else "wilson"
    return Report(metrics, rows, per_sex_table(rows), tags, reliability_tables, per_subgroup_table(rows), curve)


def _predictive_values(split: str, rows: list[MetricRow], prevalence: float) -> dict[str, float]:
    """PPV and NPV at the screening prevalence (Bayes); both rise with recall and specificity, so their interval
    maps the ends of those two intervals (which count subjects)."""
    o = {r.metric: r for r in rows if r.group == "overall"}
    out = dict(zip((f"{split}/ppv", f"{split}/npv"), ppv_npv(o["recall"].value, o["specificity"].value, prevalence)))
    for end in ("ci_low", "ci_high"):
        vals = ppv_npv(getattr(o["recall"], end), getattr(o["specificity"], end), prevalence)
        out.update({f"{k}/{end}": v for k, v in zip((f"{split}/ppv", f"{split}/npv"), vals) if math.isfinite(v)})
    return out


def _net_benefit_at(split: str, row: pd.Series) -> dict[str, float]:
    """Net benefit at the operating threshold, with its subject-bootstrap interval, beside treating everyone."""
    out = {f"{split}/net_benefit": row["net_benefit"], f"{split}/net_benefit/treat_all": row["treat_all"]}
    if math.isfinite(row["ci_low"]):
        out[f"{split}/net_benefit/ci_low"], out[f"{split}/net_benefit/ci_high"] = row["ci_low"], row["ci_high"]
    return out


def _counts(rows: list[MetricRow]) -> dict[str, float]:
    """Images, positives (photos) and patients per split and subgroup (`test/patients/male`): finite numbers the
    MLflow UI shows, which explain a not-estimable (NaN, hidden by the UI) subgroup metric beside it."""
    return {metric_name(r.split, k, r.group): float(getattr(r, k)) for r in rows
            if r.metric == "accuracy" and not r.split.endswith("_argmax") for k in ("n", "positives", "patients")}


def shown(v: float | None, digits: int = 3) -> str:
    """A logged metric as a person reads it: a NaN is a metric the run could not estimate (its `not_estimable` tag
    says why), a missing one is n/a."""
    if v is None:
        return "n/a"
    try:
        f = float(v)
    except (TypeError, ValueError):
        return str(v)
    return f"{f:.{digits}f}" if math.isfinite(f) else "not estimable"


def interval_of(metrics: dict[str, float], name: str) -> tuple[float, float] | None:
    """The logged 95% interval of a metric (`<name>/ci_low`, `<name>/ci_high`) when it and the metric are finite."""
    v, lo, hi = metrics.get(name), metrics.get(f"{name}/ci_low"), metrics.get(f"{name}/ci_high")
    return (lo, hi) if all(x is not None and math.isfinite(x) for x in (v, lo, hi)) else None


def _bounded(text: str, limit: int = 4900) -> str:
    """A tag value within what every MLflow store accepts (the UI shows a long tag in full on hover)."""
    if len(text) <= limit:
        return text
    cut = text[:limit].rsplit("; ", 1)[0]
    return f"{cut}; ... and {text.count('; ') - cut.count('; ')} more (per_subgroup.csv has every row)"


def _not_estimable_summary(rows: list[MetricRow], min_positives: int) -> list[str]:
    """One readable line per split x subgroup: which metrics are not estimable and why."""
    lines = []
    by_group: dict[tuple[str, str], list[MetricRow]] = {}
    for r in rows:
        if not r.estimable:
            by_group.setdefault((r.split, r.group), []).append(r)
    for (split, group), rs in by_group.items():
        pos = rs[0].patients
        why = (f"{pos} patients < min_positives={min_positives}" if group != "overall" and pos < min_positives
               else "undefined: no positives, no negatives or no predicted positives")
        lines.append(f"{split}/{group}: {', '.join(r.metric for r in rs)} ({why})")
    return lines
