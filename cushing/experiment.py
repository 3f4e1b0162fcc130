"""A tracked training: prepare the cohort, open the run, train, evaluate, log. Also CV folds and seed repeats.

This module composes the pure steps (train, report, plots, explain) with the two side-effect modules
(tracking for runs, release for the model); it holds no mlflow import itself.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import pandas as pd

from . import __version__, plots, tracking
from .backbones import get_spec
from .config import TrainConfig, to_params
from .engine import EpochCallback
from .report import Report, build_report
from .splits import assign_folds
from .train import Cohort, TrainOutcome, prepare_cohort, train

__all__ = ["RunSummary", "run_experiment", "run_single", "run_cv", "run_seeds", "run_name", "HEADLINE"]

HEADLINE = ("accuracy", "precision", "recall", "specificity", "f1", "auc")


@dataclass
class RunSummary:
    run_id: str
    run_name: str
    metrics: dict[str, float]
    model_uri: str | None = None
    children: list["RunSummary"] = field(default_factory=list)
    predictions: pd.DataFrame | None = None  # the run's predictions table (hashed subjects), when it trained
    stopped: str = ""  # why training ended early (patience, a pruner), if it did


def run_name(cfg: TrainConfig) -> str:
    return cfg.run_name or f"{cfg.model}{'-frozen' if cfg.frozen else ''}"


def _tags(cfg: TrainConfig, cohort: Cohort) -> dict[str, str]:
    spec = get_spec(cfg.model)
    table = cohort.table
    tags = {"model": cfg.model, "freeze": str(cfg.frozen).lower(), "model_type": spec.kind, "timm_id": spec.timm_id,
            "synthetic_data": str(cohort.manifest.synthetic).lower(), "data_digest": cohort.manifest.digest,
            "split_source": "manifest" if cohort.manifest.has_split else f"drawn (seed {cfg.split_seed})",
            "cushing_version": __version__, "allow_phi_artifacts": str(cfg.allow_phi_artifacts).lower(),
            "pretrained": str(cfg.pretrained or bool(cfg.weights)).lower()}
    if "face_mask_source" in table.columns:
        sources = sorted(table["face_mask_source"].astype(str).unique())
        tags["face_mask_source"] = ",".join(sources)
    if cohort.manifest.synthetic:
        tags["data_note"] = "SYNTHETIC demo cohort: procedurally drawn faces, not patients"
    return tags


def _chain(*callbacks: EpochCallback | None) -> EpochCallback:
    live = [c for c in callbacks if c is not None]

    def call(epoch: int, metrics: dict[str, float]) -> None:
        for c in live:
            c(epoch, metrics)
    return call


def _log_config(run: tracking.RunLogger, cfg: TrainConfig) -> None:
    """The resolved configuration as params (except those `mlflow run` already logged from -P) and config.yaml."""
    existing = tracking.get_run(run.run_id).data.params
    run.log_params({k: v for k, v in to_params(cfg).items() if k not in existing})
    run.log_dict(dataclasses.asdict(cfg), "config.yaml")


def _log_setup(run: tracking.RunLogger, cfg: TrainConfig, cohort: Cohort) -> None:
    _log_config(run, cfg)
    run.log_table(cohort.split_table(), "splits.csv")
    ds = pd.DataFrame({"subject": cohort.manifest.subject_hashes(), "split": cohort.split.to_numpy(),
                       "sex": cohort.table["sex"].to_numpy(), "label": cohort.table["label"].to_numpy()})
    name = "demo-cohort" if cohort.manifest.synthetic else "cohort"
    run.log_dataset(ds, digest=cohort.manifest.digest, name=name)


def _prevalence(cfg: TrainConfig, cohort: Cohort) -> float:
    if cfg.prevalence is not None:
        return cfg.prevalence
    return float(cohort.labels[cohort.index("train")].mean())


def _log_results(run: tracking.RunLogger, outcome: TrainOutcome, report: Report) -> dict[str, float]:
    from .tracking import artifact_dir

    fit = outcome.fit
    metrics = {**report.metrics, "best_epoch": fit.best_epoch, "epochs_run": fit.epochs_run,
               "train_seconds": fit.seconds, "temperature": outcome.temperature,
               "epoch_seconds_median": float(np.median(fit.epoch_seconds)) if fit.epoch_seconds else math.nan,
               # the first epoch carries one-off costs (cuDNN autotuning, torch.compile): compare it with the median
               "first_epoch_seconds": fit.epoch_seconds[0] if fit.epoch_seconds else math.nan}
    run.log_metrics(metrics, step=fit.epochs_run)  # at the last epoch's step, so the run's value is the final one
    tags = dict(report.tags)
    tags["device"] = outcome.device
    if fit.stopped:
        tags["stopped_early"] = fit.stopped
    run.set_tags(tags)
    pred = outcome.predictions[["subject", "split", "sex", "label", "probability", "prediction"]]
    run.log_table(pred, "predictions.csv")
    run.log_table(report.per_sex, "per_sex.csv")
    run.log_table(pd.DataFrame(fit.history), "history.csv")
    with artifact_dir() as d:
        plots.roc_plot(outcome.predictions, d / "roc.png", title=run_name(outcome.config))
        plots.confusion_plot(outcome.predictions, outcome.threshold, d / "confusion.png")
        plots.curves_plot(fit.history, fit.best_epoch, d / "curves.png")
        plots.calibration_plot(report.reliability, d / "calibration.png")
        run.log_files(d, "plots")
    return metrics


def _faces_settings(cohort: Cohort) -> dict[str, Any] | None:
    """The face-stage settings recorded in a face-crop manifest's sidecar, so serving applies the same."""
    from .faces import settings_for_manifest

    return settings_for_manifest(cohort.manifest.source)


def run_single(cfg: TrainConfig, *, cohort: Cohort | None = None, parent_run_id: str | None = None,
               on_epoch: EpochCallback | None = None, progress: bool = True,
               extra_tags: dict[str, str] | None = None, on_start: Callable[[str], None] | None = None) -> RunSummary:
    cohort = cohort or prepare_cohort(cfg, progress=progress)
    name = run_name(cfg)
    with tracking.start_run(experiment=cfg.experiment, run_name=name, tags={**_tags(cfg, cohort), **(extra_tags or {})},
                            parent_run_id=parent_run_id) as run:
        if on_start is not None:
            on_start(run.run_id)
        _log_setup(run, cfg, cohort)
        outcome = train(cfg, cohort, on_epoch=_chain(run.log_epoch, on_epoch), progress=progress)
        run.flush()
        report = build_report(outcome.predictions, threshold=outcome.threshold, min_positives=cfg.min_positives,
                              bootstrap=cfg.bootstrap, seed=cfg.seed, prevalence=_prevalence(cfg, cohort))
        metrics = _log_results(run, outcome, report)
        if cfg.cam:
            metrics.update(_log_cams(run, outcome, cohort))
        uri = None
        if cfg.log_model:
            from . import release

            uri = release.log_model(outcome, faces=_faces_settings(cohort), data_digest=cohort.manifest.digest)
            run.set_tags({"model_uri": uri})
        return RunSummary(run.run_id, name, metrics, uri, predictions=outcome.predictions,
                          stopped=outcome.fit.stopped)


def _log_cams(run: tracking.RunLogger, outcome: TrainOutcome, cohort: Cohort) -> dict[str, float]:
    from . import explain
    from .tracking import artifact_dir

    with artifact_dir() as d:
        result = explain.explain_outcome(outcome, cohort, out_dir=d, allow_phi=outcome.config.allow_phi_artifacts)
        run.log_files(d, None)
        run.log_metrics(result.metrics)
        run.set_tags(result.tags)
    return result.metrics


def _fold_split(folds: pd.Series, i: int, k: int) -> pd.Series:
    """Fold i is the test fold, fold i+1 (mod k) validates, the rest train."""
    out = np.where(folds == i, "test", np.where(folds == (i + 1) % k, "val", "train"))
    return pd.Series(out, index=folds.index, name="split")


def _recentre(pred: pd.DataFrame, threshold: float) -> pd.DataFrame:
    """Shift a fold's scores on the logit scale so its validation-chosen threshold lands at 0.5."""
    from .evidence import logit

    out = pred.copy()
    out["probability"] = 1 / (1 + np.exp(-(logit(out["probability"].to_numpy()) - logit(np.array([threshold]))[0])))
    return out


def run_cv(cfg: TrainConfig, *, cohort: Cohort | None = None, progress: bool = True,
           parent_run_id: str | None = None) -> RunSummary:
    """Stratified group k-fold: a parent run with one child per fold and pooled out-of-fold metrics."""
    cohort = cohort or prepare_cohort(cfg, progress=progress)
    k = cfg.cv_folds
    folds = assign_folds(cohort.table, k, seed=cfg.split_seed)
    child_cfg = dataclasses.replace(cfg, cv_folds=0, seeds=1)
    name = f"{run_name(cfg)}-cv{k}"
    with tracking.start_run(experiment=cfg.experiment, run_name=name, tags={**_tags(cfg, cohort), "cv_folds": str(k)},
                            parent_run_id=parent_run_id) as parent:
        _log_config(parent, cfg)
        children, pooled = [], []
        for i in range(k):
            fold_cohort = cohort.with_split(_fold_split(folds, i, k))
            fcfg = dataclasses.replace(child_cfg, run_name=f"{run_name(cfg)}-fold{i}")
            summary = run_single(fcfg, cohort=fold_cohort, parent_run_id=parent.run_id, progress=progress,
                                 extra_tags={"fold": str(i)})
            children.append(summary)
            test = summary.predictions[summary.predictions["split"] == "test"]
            pooled.append(_recentre(test, summary.metrics["threshold"]).assign(fold=i))
        oof = pd.concat(pooled, ignore_index=True).assign(split="oof")
        report = build_report(oof, threshold=0.5, splits=("oof",), min_positives=cfg.min_positives,
                              bootstrap=cfg.bootstrap, seed=cfg.seed, prevalence=_prevalence(cfg, cohort),
                              argmax_split=None)
        metrics = {**report.metrics, **_spread(children)}
        parent.log_metrics(metrics)
        parent.set_tags(report.tags)
        parent.log_table(oof[["subject", "fold", "sex", "label", "probability"]], "oof_predictions.csv")
        parent.log_table(report.per_sex, "per_sex.csv")
        parent.log_table(pd.DataFrame({"fold": folds.to_numpy(), "sex": cohort.table["sex"].to_numpy(),
                                       "label": cohort.labels}).value_counts().rename("images").reset_index()
                         .sort_values(["fold", "sex", "label"]), "folds.csv")
        return RunSummary(parent.run_id, name, metrics, None, children)


def _spread(children: list[RunSummary]) -> dict[str, float]:
    """Mean and standard deviation over child runs of the headline validation and test metrics."""
    out = {}
    for split in ("val", "test"):
        for m in HEADLINE:
            vals = np.array([c.metrics.get(f"{split}/{m}", math.nan) for c in children], float)
            vals = vals[np.isfinite(vals)]
            if len(vals):
                out[f"{split}/{m}/mean"] = float(vals.mean())
                out[f"{split}/{m}/std"] = float(vals.std(ddof=1)) if len(vals) > 1 else 0.0
    return out


def run_seeds(cfg: TrainConfig, *, cohort: Cohort | None = None, progress: bool = True,
              parent_run_id: str | None = None) -> RunSummary:
    """The same configuration with seeds seed..seed+N-1 on the same split; parent logs mean and std."""
    cohort = cohort or prepare_cohort(cfg, progress=progress)
    name = f"{run_name(cfg)}-seeds{cfg.seeds}"
    with tracking.start_run(experiment=cfg.experiment, run_name=name, tags={**_tags(cfg, cohort),
                            "seeds": str(cfg.seeds)}, parent_run_id=parent_run_id) as parent:
        _log_config(parent, cfg)
        children = []
        for j in range(cfg.seeds):
            scfg = dataclasses.replace(cfg, seeds=1, cv_folds=0, seed=cfg.seed + j,
                                       run_name=f"{run_name(cfg)}-seed{cfg.seed + j}")
            children.append(run_single(scfg, cohort=cohort, parent_run_id=parent.run_id, progress=progress,
                                       extra_tags={"seed": str(cfg.seed + j)}))
        spread = _spread(children)
        parent.log_metrics(spread)
        return RunSummary(parent.run_id, name, spread, None, children)


def run_experiment(cfg: TrainConfig, *, progress: bool = True, on_epoch: EpochCallback | None = None,
                   parent_run_id: str | None = None) -> RunSummary:
    """The main job: a single run, CV folds or seed repeats, as the config asks."""
    if cfg.cv_folds > 1:
        return run_cv(cfg, progress=progress, parent_run_id=parent_run_id)
    if cfg.seeds > 1:
        return run_seeds(cfg, progress=progress, parent_run_id=parent_run_id)
    return run_single(cfg, progress=progress, on_epoch=on_epoch, parent_run_id=parent_run_id)

