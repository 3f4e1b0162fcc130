"""`cushing dashboard`: the paper's tables and figures from MLflow runs, as one self-contained HTML file. Definitions
(template, styles, script, what to show) live in the top-level dashboards/ folder. The page embeds only aggregates
(metrics, hashed-id predictions turned into curves, mean CAM maps) and loads nothing at view time: figures are inline
PNGs, scripts and styles are inlined, and a Content-Security-Policy forbids requests.
"""
from __future__ import annotations

import base64
import datetime as dt
import io
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cushing import __version__, tracking
from cushing.stats import calibration, plots
from cushing.stats.metrics import auc, lower_is_better, roc_points
from cushing.stats.report import interval_of, shown
from cushing.release.registry import registry_status

__all__ = ["DashboardError", "build_dashboard", "collect", "dashboards_dir"]


class DashboardError(RuntimeError):
    pass


def dashboards_dir() -> Path:
    return Path(os.environ.get("CUSHING_DASHBOARDS") or Path(__file__).resolve().parents[2] / "dashboards")


def _definition(name: str) -> tuple[dict[str, Any], Path]:
    import yaml

    path = dashboards_dir() / f"{name}.yaml"
    if not path.exists():
        raise DashboardError(f"no dashboard definition {path}")
    return yaml.safe_load(path.read_text()), path.parent


@dataclass
class RunData:
    run: Any
    predictions: pd.DataFrame | None
    cam: dict[str, np.ndarray]
    splits: pd.DataFrame | None
    origin: str = ""  # a registry model trained outside the runs shown: its sweep's (parent run's) name
    decision: pd.DataFrame | None = None  # decision_curve.csv


def _or_none(fetch, *args):
    try:
        return fetch(*args)
    except Exception:  # not logged by this run; a run deleted, or in another store
        return None


def _trained(r) -> bool:
    return r.status == "FINISHED" and "test/f1" in r.metrics and "model" in r.tags


def collect(experiment: str, parent_run_id: str | None = None, also: tuple[str, ...] = ()) -> list[RunData]:
    """Finished training runs (with test metrics) of an experiment or of one parent, with their aggregates; and
    the runs `also` names (the registry's champion and challenger) wherever they were trained."""
    runs = [r for r in tracking.find_runs(experiment, parent_run_id=parent_run_id) if _trained(r)]
    if parent_run_id is None:
        runs = [r for r in runs if r.tags.get("task") not in ("explain", "external_validation")]
    if not runs:
        where = f"parent run {parent_run_id}" if parent_run_id else f"experiment {experiment!r}"
        others = ", ".join(f"{name!r} ({n} runs)" for name, n in tracking.experiments_with_runs()
                           if name != experiment)
        hint = (f"Experiments with runs: {others} (pass --experiment NAME or --project STUDY.yaml)." if others
                else "Train or sweep first (e.g. `cushing sweep projects/demo.yaml`).")
        raise DashboardError(f"{where} has no finished training runs with test metrics: nothing to show. {hint}")
    own = {r.run_id for r in runs}
    extra = [r for i in dict.fromkeys(i for i in also if i not in own) if (r := _or_none(tracking.get_run, i))
             and _trained(r)]
    origin = {r.run_id: ((r.parent_run_id and _or_none(tracking.get_run, r.parent_run_id)) or r).name
              for r in extra}  # its sweep
    runs += extra
    for r in runs:
        cam = _or_none(tracking.list_artifacts, r.run_id, "cam") or ()
        if any(a.endswith("overlays") for a in cam) and r.tags.get("allow_phi_artifacts") != "true":
            raise DashboardError(f"run {r.run_id} holds per-image artifacts (cam/overlays) but was not run with "
                                 "allow_phi_artifacts=true: refusing to build a dashboard from it")
    out = []
    with tracking.artifact_dir() as d:
        for r in runs:
            pred, npz, spl, dc = (_or_none(tracking.download_artifact, r.run_id, path, d / r.run_id) for path in
                                  ("predictions.csv", "cam/mean_maps.npz", "splits.csv", "decision_curve.csv"))
            pred, spl, dc = (pd.read_csv(f) if f else None for f in (pred, spl, dc))
            cam = {}
            if npz is not None:
                with np.load(npz) as z:
                    cam = {str(k): z[str(k)].astype(np.float32) for k in z["names"]}
            out.append(RunData(r, pred, cam, spl, origin.get(r.run_id, ""), dc))
    return out


def _label(r) -> str:
    return r.tags.get("sweep_config") or r.tags.get("mlflow.runName") or r.run_id[:8]


def _cell(m: dict, name: str) -> dict[str, Any]:
    """A table cell: the value to sort by, the text shown (`report.shown`), whether it is missing, its interval."""
    v, ci = m.get(name), interval_of(m, name)
    na = v is None or not math.isfinite(v)
    return {"value": "" if na else f"{v:.6f}", "text": shown(v), "na": na,
            "ci": f"[{ci[0]:.2f}, {ci[1]:.2f}]" if ci else ""}


def _png(fig) -> str:
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plots.pyplot().close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _tests(ranked: list[RunData], top: int):
    """(run, test labels, test probabilities) of the first `top` runs that have predictions."""
    for rd in ranked[:top]:
        if rd.predictions is not None:
            t = rd.predictions[rd.predictions["split"] == "test"]
            yield rd, t["label"].to_numpy(), t["probability"].to_numpy()


def _roc_figure(ranked: list[RunData], top: int) -> str:
    fig, ax = plots.pyplot().subplots(figsize=(5.2, 4.8))
    for rd, y, p in _tests(ranked, top):
        if 0 < y.sum() < len(y):
            fpr, tpr = roc_points(y, p)
            ax.plot(fpr, tpr, drawstyle="steps-post", label=f"{_label(rd.run)} ({float(auc(y, p)[0]):.3f})")
    ax.plot([0, 1], [0, 1], color="0.8", lw=0.8, label="chance")
    ax.set(xlabel="1 - specificity", ylabel="sensitivity", xlim=(0, 1), ylim=(0, 1.01), title="test ROC (AUC)")
    ax.legend(fontsize=7, loc="lower right")
    return _png(fig)


def _calibration_figure(ranked: list[RunData], top: int) -> str:
    fig, ax = plots.pyplot().subplots(figsize=(5.2, 4.8))
    ax.plot([0, 1], [0, 1], color="0.8", lw=0.8, label="perfect")
    for rd, y, p in _tests(ranked, top):
        rel = calibration.reliability(y, p)
        rel = rel[rel["count"] > 0]
        ax.plot(rel["mean_predicted"], rel["observed_rate"], "o-", ms=3,
                label=f"{_label(rd.run)} (ECE {calibration.ece(y, p):.3f})")
    ax.set(xlabel="mean predicted probability", ylabel="observed patient rate", xlim=(0, 1), ylim=(0, 1),
           title="test calibration")
    ax.legend(fontsize=7, loc="upper left")
    return _png(fig)


def _decision_figure(ranked: list[RunData], top: int) -> str | None:
    shown_ = [rd for rd in ranked[:top] if rd.decision is not None and not rd.decision.empty]
    return _png(plots.decision_plot(
        {_label(rd.run): rd.decision for rd in shown_},
        {_label(rd.run): (rd.run.metrics["threshold"], rd.run.metrics.get("test/net_benefit", math.nan))
         for rd in shown_}, title="test decision curves")) if shown_ else None


def _per_sex_figure(ranked: list[RunData]) -> str:
    labels = [_label(rd.run) for rd in ranked]
    fig, axes = plots.pyplot().subplots(1, 2, figsize=(max(6, 1.1 * len(labels) + 3), 3.6))
    x = np.arange(len(labels))
    for ax, metric in zip(axes, ("f1", "recall")):
        for k, (group, color) in enumerate((("female", "C1"), ("male", "C0"))):
            vals = [rd.run.metrics.get(f"test/{metric}/{group}", math.nan) for rd in ranked]
            hatch = [not math.isfinite(v) for v in vals]
            bars = ax.bar(x + (k - 0.5) * 0.38, [0.02 if na else v for v, na in zip(vals, hatch)], 0.38,
                          color=color, label=group)
            for b, na in zip(bars, hatch):
                if na:
                    b.set(hatch="//", alpha=0.4)
        ax.set_xticks(x, labels, rotation=40, ha="right", fontsize=7)
        ax.set(ylim=(0, 1.05), title=f"test {metric} by sex")
        ax.legend(fontsize=7)
    return _png(fig)


def _cam_figure(ranked: list[RunData], n: int) -> str | None:
    with_cam = [rd for rd in ranked if "all" in rd.cam][:n]
    if not with_cam:
        return None
    fig, axes = plots.pyplot().subplots(1, len(with_cam), figsize=(2.2 * len(with_cam), 2.5), squeeze=False)
    for ax, rd in zip(axes[0], with_cam):
        ax.imshow(rd.cam["all"], cmap="inferno")
        ax.set_title(_label(rd.run), fontsize=8)
        ax.axis("off")
    return _png(fig)


def _cohort(runs: list[RunData]) -> tuple[list[dict] | None, str]:
    with_splits = [rd for rd in runs if rd.splits is not None]
    if not with_splits:
        return None, ""
    n = len({rd.run.tags.get("data_digest") for rd in with_splits})
    note = "" if n <= 1 else f"Runs come from {n} different cohorts; the first is shown."
    return with_splits[0].splits.to_dict("records"), note


def _other_subgroups(metrics: dict[str, float]) -> list[str]:
    """Subgroups of manifest columns other than sex (`site:A`), from the run's `test/n/<column>:<value>` counts."""
    return sorted(k[len("test/n/"):] for k in metrics if k.startswith("test/n/") and ":" in k)


def rank_runs(runs: list[RunData], metric: str) -> list[RunData]:
    """Best first in the metric's own direction (`lower_is_better`: a loss or Brier score ranks ascending);
    runs without a finite value last."""
    sign = 1.0 if lower_is_better(metric) else -1.0

    def key(rd: RunData) -> float:
        v = rd.run.metrics.get(metric, math.nan)
        return sign * v if math.isfinite(v) else math.inf
    return sorted(runs, key=key)


def build_dashboard(*, experiment: str, parent_run_id: str | None = None, out: str | Path = "dashboard.html",
                    name: str = "paper", log: bool = True) -> Path:
    import jinja2

    spec, root = _definition(name)
    registry = registry_status()
    runs = collect(experiment, parent_run_id, also=tuple(a["run"] for a in registry))  # ranked wherever trained
    rank_metric = next((r.run.params.get("select_metric") for r in runs if r.run.params.get("select_metric")),
                       "val/f1")
    ranked = rank_runs(runs, rank_metric)
    by_run = {a["run"]: a["alias"] for a in reversed(registry)}
    rows, per_sex, per_subgroup = [], [], []
    for rd in ranked:
        m, t = rd.run.metrics, rd.run.tags
        test = None if rd.predictions is None else rd.predictions[rd.predictions["split"] == "test"]
        rv = m.get(rank_metric, math.nan)
        rows.append({"label": _label(rd.run), "freeze": t.get("freeze", ""), "kind": t.get("model_type", ""),
                     "rank_value": f"{rv:.6f}" if math.isfinite(rv) else "", "rank_text": f"{rv:.3f}"
                     if math.isfinite(rv) else "n/a", "alias": by_run.get(rd.run.run_id, ""),
                     "run": rd.run.run_id, "origin": rd.origin,
                     "test": {k: _cell(m, f"test/{k}") for k in spec["leaderboard_metrics"]}})
        for group in ("female", "male"):
            pos = "" if test is None else int(test.loc[test["sex"] == group[0].upper(), "label"].sum())
            per_sex.append({"label": _label(rd.run), "group": group, "positives": pos,
                            "metrics": {k: _cell(m, f"test/{k}/{group}") for k in spec["per_sex_metrics"]}})
        for group in _other_subgroups(m):
            per_subgroup.append({"label": _label(rd.run), "group": group.replace(":", " = ", 1),
                                 "positives": int(m.get(f"test/positives/{group}", 0)),
                                 "metrics": {k: _cell(m, f"test/{k}/{group}") for k in spec["per_sex_metrics"]}})
    cohort, cohort_note = _cohort(runs)
    figures = {"roc": _roc_figure(ranked, spec["roc_top"]), "calibration": _calibration_figure(ranked,
               spec["calibration_top"]), "per_sex": _per_sex_figure(ranked), "cam": _cam_figure(ranked,
               spec["cam_models"]), "decision": _decision_figure(ranked, spec["roc_top"])}
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(root)), autoescape=True)
    html = env.get_template(spec["template"]).render(
        title=spec["title"], experiment=experiment, parent=parent_run_id, runs=rows, per_sex=per_sex,
        per_subgroup=per_subgroup, leaderboard_metrics=spec["leaderboard_metrics"], rank_metric=rank_metric,
        per_sex_metrics=spec["per_sex_metrics"], roc_top=spec["roc_top"], cohort=cohort, cohort_note=cohort_note,
        figures=figures, registry=registry, version=__version__,
        synthetic=any(rd.run.tags.get("synthetic_data") == "true" for rd in runs),
        built=dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        css=(root / spec["styles"]).read_text(), js=(root / spec["script"]).read_text())
    out = Path(out)
    out.write_text(html)
    if log:
        _log(out, experiment, parent_run_id)
    return out


def _log(path: Path, experiment: str, parent_run_id: str | None) -> None:
    """Into the run `mlflow run -e dashboard` created (nested under the sweep shown); else into the sweep's
    parent run; else a new run named dashboard."""
    import shutil

    with tracking.artifact_dir() as d, tracking.log_into(parent_run_id, experiment=experiment, run_name="dashboard",
                                                         tags={"task": "dashboard"}) as r:
        shutil.copy(path, d / "dashboard.html")  # a folder holding only the dashboard, named dashboard.html
        r.log_files(d)
