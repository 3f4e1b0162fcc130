"""Finishing a trained run, on the thread that trained it: score the held best weights, intervals, the logged
model, tables, plots and Grad-CAM into one artifact folder, then the final metrics, tags and one upload."""
from __future__ import annotations

import contextlib
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cushing import release, tracking
from cushing.config import TrainConfig, run_name
from cushing.faces.settings import settings_for_manifest
from cushing.model import explain
from cushing.model.checkpoint import remove_checkpoint
from cushing.model.train import Cohort, Fitted, TrainOutcome, score
from cushing.phases import PhaseTimer, phase
from cushing.stats import plots
from cushing.stats.report import Report, build_report

__all__ = ["RunSummary", "Trained", "finish_part"]


@dataclass
class RunSummary:
    run_id: str
    run_name: str
    metrics: dict[str, float]
    model_uri: str | None = None
    children: list["RunSummary"] = field(default_factory=list)
    predictions: pd.DataFrame | None = None  # the run's predictions table (hashed subjects), when it trained
    stopped: str = ""  # why training ended early (patience, a pruner), if it did
    selection: str = ""  # which epoch was kept and its per-epoch value (what the epoch bar showed last as best)
    phases: PhaseTimer | None = None  # where the run's wall time went, by named phase


def _prevalence(cfg: TrainConfig, cohort: Cohort) -> float:
    return cfg.prevalence if cfg.prevalence is not None else float(cohort.labels[cohort.index("train")].mean())


def _results(outcome: TrainOutcome, report: Report) -> tuple[dict[str, float], dict[str, str]]:
    """The final metrics (at step 0; per-epoch series are under epoch/) and tags of a trained run."""
    fit = outcome.fit
    metrics = {**report.metrics, "best_epoch": fit.best_epoch, "epochs_run": fit.epochs_run,
               "train_seconds": fit.seconds, "temperature": outcome.temperature,
               "epoch_seconds_median": float(np.median(fit.epoch_seconds)) if fit.epoch_seconds else math.nan,
               # the first epoch carries one-off costs (cuDNN autotuning, torch.compile): compare it with the median
               "first_epoch_seconds": fit.epoch_seconds[0] if fit.epoch_seconds else math.nan}
    tags = {**report.tags, "device": outcome.device}
    if fit.stopped:
        tags["stopped_early"] = fit.stopped
    op = outcome.operating
    if op is not None and op.statement:  # a guaranteed rule (sensitivity_lcb, specificity_lcb): met or not
        tags["threshold_guarantee"] = op.statement
        metrics.update({"threshold/lower_bound": op.lower_bound, "threshold/guarantee_met": float(op.met)})
        if not op.met:
            print(f"cushing: {run_name(outcome.config)}: threshold {op.rule} {op.statement}", file=sys.stderr,
                  flush=True)
    return metrics, tags


def _write_tables(d: Path, outcome: TrainOutcome, report: Report) -> None:
    """predictions.csv, per_sex.csv, per_subgroup.csv, history.csv and decision_curve.csv into the run's folder."""
    extra = [c for c in outcome.config.subgroup_columns if c != "sex"]
    pred = outcome.predictions[["subject", "split", "sex", *extra, "label", "probability", "prediction"]]
    for table, name in ((pred, "predictions.csv"), (report.per_sex, "per_sex.csv"),
                        (report.per_subgroup, "per_subgroup.csv"), (pd.DataFrame(outcome.fit.history), "history.csv"),
                        (report.decision_curve, "decision_curve.csv")):
        table.to_csv(d / name, index=False)


def _write_plots(d: Path, outcome: TrainOutcome, report: Report) -> None:
    (p := d / "plots").mkdir()
    plots.roc_plot(outcome.predictions, p / "roc.png", title=run_name(outcome.config))
    plots.confusion_plot(outcome.predictions, outcome.threshold, p / "confusion.png")
    plots.curves_plot(outcome.fit.history, outcome.fit.best_epoch, p / "curves.png")
    plots.calibration_plot(report.reliability, p / "calibration.png")
    plots.decision_plot({"model": report.decision_curve}, {"model": (outcome.threshold, report.metrics.get(
        "test/net_benefit", math.nan))}, p / "decision_curve.png", "decision curve (test)")


class _Stages:
    """One progress line for the work after the epoch bar (intervals, model, tables and plots, Grad-CAM), so the
    seconds it takes are not silent."""

    def __init__(self, names: list[str], progress: bool):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=len(names), desc="after training", unit="stage", disable=not progress, leave=False,
                        bar_format="{desc}: {n_fmt}/{total_fmt} {postfix} [{elapsed}]")
        self.started = False

    def __call__(self, name: str) -> None:
        if self.started:
            self.bar.update(1)
        self.started = True
        self.bar.set_postfix_str(name)


@dataclass
class Trained:
    """What finishing a run needs once its training loop is over: the open run, its configuration and cohort,
    and the best-epoch model not yet scored."""

    run: tracking.RunLogger
    cfg: TrainConfig
    cohort: Cohort
    fitted: Fitted


def finish_part(trained: Trained, *, progress: bool) -> RunSummary:
    """Everything after the training loop: score the held best weights (val, test), intervals, the logged model,
    results, tables, plots and Grad-CAM, written into one artifact folder; then the final metrics and tags in one
    call each and the folder in one upload; a failure still logs what was made before it. The run is not ended
    here."""
    cfg, cohort, run = trained.cfg, trained.cohort, trained.run
    stages = _Stages(["scoring", "intervals"] + ["model"] * cfg.log_model + ["tables and plots"]
                     + ["Grad-CAM"] * cfg.cam, progress)
    try:
        stages("scoring")
        with phase("scoring (val, test)"):
            outcome = score(trained.fitted, cohort)
        stages("intervals (bootstrap)")
        with phase("intervals (bootstrap)"):
            report = build_report(outcome.predictions, threshold=outcome.threshold, min_positives=cfg.min_positives,
                                  bootstrap=cfg.bootstrap, seed=cfg.seed, prevalence=_prevalence(cfg, cohort),
                                  subgroup_columns=cfg.subgroup_columns)
        metrics, tags = _results(outcome, report)
        made: dict[str, Any] = {"metrics": metrics, "tags": tags, "uri": None}
        with tracking.artifact_dir() as d:
            try:
                _finish_into(d, trained, outcome, report, stages, made)
            except BaseException:
                _keep_what_was_made(run, d, made)
                raise
            with phase("final metrics and tags"):
                run.log_metrics(made["metrics"])  # final results at step 0; per-epoch series are under epoch/
                run.set_tags(made["tags"])
            with phase("artifact upload"):
                run.log_files(d, None)
    finally:
        stages.bar.close()
    remove_checkpoint(run.run_id)  # finished: nothing to resume
    return _summary(trained, outcome, made["metrics"], made["uri"])


def _summary(trained: Trained, outcome: TrainOutcome, metrics: dict[str, float], uri: str | None) -> RunSummary:
    cfg, fit = trained.cfg, outcome.fit
    selection = (f"best epoch {fit.best_epoch} of {fit.epochs_run} by {cfg.select_metric} "
                 f"{fit.best_score:.3f} per epoch (at argmax, as the epoch bar showed); final results at that "
                 f"epoch and the threshold {outcome.threshold:.3f} chosen on validation (rule {cfg.threshold})"
                 + (f"; {outcome.operating.statement}" if outcome.operating and outcome.operating.statement else ""))
    return RunSummary(trained.run.run_id, run_name(cfg), metrics, uri, predictions=outcome.predictions,
                      stopped=fit.stopped, selection=selection)


def _finish_into(d: Path, trained: Trained, outcome: TrainOutcome, report: Report, stages: _Stages,
                 made: dict[str, Any]) -> None:
    """Model, tables, plots, Grad-CAM: files into `d`, metrics and tags into `made` as they come (so that a
    failure later keeps them)."""
    cfg, cohort = trained.cfg, trained.cohort
    if cfg.log_model:  # first, so that the final metrics logged next are linked to the logged model
        stages("model")
        made["uri"] = _log_model(trained.run, outcome, cohort)
    stages("tables and plots")
    with phase("tables"):
        _write_tables(d, outcome, report)
    with phase("plots"):
        _write_plots(d, outcome, report)
    if cfg.cam:
        stages("Grad-CAM")
        cams = explain.explain_outcome(outcome, cohort, out_dir=d, allow_phi=cfg.allow_phi_artifacts)
        made["metrics"].update(cams.metrics)
        made["tags"].update(cams.tags)


def _keep_what_was_made(run: tracking.RunLogger, d: Path, made: dict[str, Any]) -> None:
    """A step after training failed (the run ends FAILED): log the results and files made before it, best effort,
    never hiding the failure itself."""
    for keep in (lambda: run.log_metrics(made["metrics"]), lambda: run.set_tags(made["tags"]),
                 lambda: run.log_files(d, None)):
        with contextlib.suppress(Exception):
            keep()


def _log_model(run: tracking.RunLogger, outcome: TrainOutcome, cohort: Cohort) -> str:
    # the face-stage settings a face-crop manifest's sidecar recorded, so serving applies the same
    logged = release.log_model(outcome, faces=settings_for_manifest(cohort.manifest.source),
                               data_digest=cohort.manifest.digest, synthetic=cohort.manifest.synthetic,
                               run_id=run.run_id)
    run.model_id = logged.model_id
    run.set_tags({"model_uri": logged.uri})
    return logged.uri
