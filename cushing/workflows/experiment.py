"""A tracked training: prepare the cohort, open the run, train, evaluate, log. Also CV folds and seed repeats.
Composes the pure steps with tracking (runs) and release (the model); no mlflow import here.
"""
from __future__ import annotations

import dataclasses
import itertools
import math
import os
from typing import Callable

import numpy as np
import pandas as pd

from cushing import __version__, stops, tracking
from cushing.model.backbones import get_spec
from cushing.config import EXECUTION_FIELDS, TrainConfig, config_digest, resolve, run_name, to_params
from cushing.model.checkpoint import (CHECKPOINT, Checkpointer, ResumeBusy, checkpoint_dir, load_checkpoint,
                                      resume_lock)
from cushing.model.engine import EpochCallback, FitState
from cushing.stats.metrics import METRICS
from cushing.stats.report import build_report
from cushing.data.audit.settings import TOGETHER
from cushing.data.manifest import skipped_counts
from cushing.data.splits import assign_folds, fold_split
from cushing.faces.settings import settings_for_manifest
from cushing.model.train import Cohort, fit_model, prepare_cohort
from cushing.stats.calibration import brier, ece, logit
from cushing.phases import PHASES_OUT_ENV, phase, phased, process_start_time, timing
from cushing.workflows.finishing import RunSummary, Trained, _prevalence, finish_part

__all__ = ["RunSummary", "run_experiment", "run_single", "run_cv", "run_seeds",
           "resume_single", "ResumeError", "Trained", "train_part", "finish_part"]


def _tags(cfg: TrainConfig, cohort: Cohort) -> dict[str, str]:
    spec = get_spec(cfg.model)
    tags = {"model": cfg.model, "freeze": str(cfg.frozen).lower(), "model_type": spec.kind, "timm_id": spec.timm_id,
            "synthetic_data": str(cohort.manifest.synthetic).lower(), "data_digest": cohort.manifest.digest,
            "split_source": "manifest" if cohort.manifest.has_split else f"drawn (seed {cfg.split_seed})",
            "cushing_version": __version__, "allow_phi_artifacts": str(cfg.allow_phi_artifacts).lower(),
            "pretrained": str(cfg.pretrained or bool(cfg.weights)).lower(), "config_digest": config_digest(cfg)}
    if "face_mask_source" in cohort.table.columns:
        tags["face_mask_source"] = ",".join(sorted(cohort.table["face_mask_source"].astype(str).unique()))
    if cohort.manifest.synthetic:
        tags["data_note"] = "SYNTHETIC demo cohort: procedurally drawn faces, not patients"
    return tags


def _log_config(run: tracking.RunLogger, cfg: TrainConfig) -> None:
    """The resolved configuration as params (those `mlflow run` already logged from -P kept, a value resolved to
    something else as `resolved/<name>`) and config.yaml."""
    run.log_params(to_params(cfg))
    run.log_dict(dataclasses.asdict(cfg), "config.yaml")


def _log_setup(run: tracking.RunLogger, cfg: TrainConfig, cohort: Cohort) -> None:
    _log_config(run, cfg)
    run.log_table(cohort.split_table(), "splits.csv")
    ds = pd.DataFrame({"subject": cohort.manifest.subject_hashes(), "split": cohort.split.to_numpy(),
                       "sex": cohort.table["sex"].to_numpy(), "label": cohort.table["label"].to_numpy()})
    run.log_dataset(ds, digest=cohort.manifest.digest, name="demo-cohort" if cohort.manifest.synthetic else "cohort")
    # photos left out here (skip_bad_photos) and by the face stage that made these crops (its sidecar)
    faces = (settings_for_manifest(cohort.manifest.source) or {}).get("skipped", {})
    run.log_metrics({k: v + faces.get(k, 0.0) for k, v in skipped_counts(cohort.manifest.skipped).items()})
    if cohort.audit is not None:
        _log_audit(run, cfg, cohort)


def _log_audit(run: tracking.RunLogger, cfg: TrainConfig, cohort: Cohort) -> None:
    """The cohort audit that shaped the split: audit.csv (pair numbers, CSV lines and hashed ids only), counts, how
    many subjects joined another's split group as one person (merges) or as a precaution, and a warning when a
    given split keeps such pairs apart."""
    audit, split = cohort.audit, cohort.split.to_numpy()
    pairs = audit.pairs.assign(split_a=split[audit.pairs["line_a"].to_numpy() - 2],
                               split_b=split[audit.pairs["line_b"].to_numpy() - 2])
    pairs["straddles_splits"] = pairs["split_a"] != pairs["split_b"]
    lines = cohort.manifest.lines  # CSV lines (they differ from the table's rows once photos are skipped)
    pairs["line_a"], pairs["line_b"] = lines[pairs["line_a"] - 2], lines[pairs["line_b"] - 2]
    run.log_table(pairs, "audit.csv")
    apart = int((pairs["straddles_splits"] & ~pairs["same_subject"] & pairs["outcome"].isin(TOGETHER)).sum())
    run.log_metrics({**audit.summary(), "audit/merges": float(cohort.merges),
                     "audit/precautions": float(cohort.precautions), "audit/pairs_across_splits": apart})
    tags = {"audit": cfg.audit, "audit_merges": str(cohort.merges), "audit_precautions": str(cohort.precautions),
            **audit.params()}
    if apart:
        tags["audit_warning"] = (f"{apart} pair(s) of different subjects, merged as one photo or one person or kept "
                                 "together as a precaution, sit in different splits (a split given in the manifest "
                                 "is kept as it is): see audit.csv")
    run.set_tags(tags)


def run_single(cfg: TrainConfig, *, cohort: Cohort | None = None, parent_run_id: str | None = None,
               on_epoch: EpochCallback | None = None, progress: bool = True, extra_tags: dict[str, str] | None = None,
               on_start: Callable[[str], None] | None = None) -> RunSummary:
    """One tracked training, finished (scored, logged, ended) before it returns."""
    with stops.cooperative(), timing() as timer:
        with phase("store: tracking server check"):
            tracking.check_reachable()  # an unreachable server fails now, before any image is decoded
        cohort = cohort or prepare_cohort(cfg, progress=progress)
        opened = tracking.start_run(experiment=cfg.experiment, run_name=run_name(cfg), parent_run_id=parent_run_id,
                                    tags={**_tags(cfg, cohort), **(extra_tags or {})})
        with phased(opened, "run start (store, experiment, tags, heartbeat)", "run end") as run:
            stops.check()  # a stop that came while the run was being opened ends it KILLED
            if on_start is not None:
                on_start(run.run_id)
            with phase("setup logging (params, splits, dataset)"):
                _log_setup(run, cfg, cohort)
            summary = finish_part(train_part(run, cfg, cohort, on_epoch=on_epoch, progress=progress), progress=progress)
    summary.phases = timer
    return summary


def train_part(run: tracking.RunLogger, cfg: TrainConfig, cohort: Cohort, *, on_epoch: EpochCallback | None,
               progress: bool, resume: FitState | None = None, logged: int = 0) -> Trained:
    """The training loop of a run (from the start, or on from a checkpoint), its epochs logged as they end (written
    by the run logger's own thread). Epochs up to `logged` (a resumed run's epochs already in MLflow before it
    stopped) are recomputed but not logged twice."""
    saver = (Checkpointer(run.run_id, lambda path, epoch: run.note_checkpoint(path, epoch, cfg.log_checkpoint))
             if cfg.checkpoint_every else None)

    def log_epoch(epoch: int, metrics: dict[str, float]) -> None:
        if epoch > logged:
            run.log_epoch(epoch, metrics)
        if on_epoch is not None:
            on_epoch(epoch, metrics)
    fitted = fit_model(cfg, cohort, on_epoch=log_epoch, progress=progress, resume=resume, on_checkpoint=saver)
    with phase("epoch metrics flush"):
        run.flush()
    return Trained(run, cfg, cohort, fitted)


class ResumeError(ValueError):
    """A run that cannot be continued; the message says why and what to do instead."""


def resume_single(cfg: TrainConfig, *, progress: bool = True) -> RunSummary:
    """Continue a stopped run (cfg.resume: its id, or "true" for the latest stopped run of this configuration)
    from its last checkpoint, in the same MLflow run, with the configuration it was started with."""
    tracking.check_reachable()
    env_run = tracking.launcher_run()
    target = _resume_target(cfg, env_run)
    try:
        with resume_lock(target):
            return _resume(target, cfg, env_run, progress)
    except ResumeBusy as e:
        raise ResumeError(f"{e}; wait for it, or stop it first") from None


def _resume(target: str, cfg: TrainConfig, env_run: str | None, progress: bool) -> RunSummary:
    saved = _saved_config(target, cfg)
    state = _checkpoint_of(target)
    cohort = prepare_cohort(saved, progress=progress)
    digest = tracking.get_run(target).tags.get("data_digest")
    if digest and digest != cohort.manifest.digest:
        raise ResumeError(f"run {target} trained on data with digest {digest[:12]}; {saved.data} now has "
                          f"{cohort.manifest.digest[:12]}: resuming would mix cohorts")
    if env_run and env_run != target:  # `mlflow run -P resume=...` made a new run: point it at the resumed one
        with tracking.resume_run(env_run) as pointer:
            pointer.set_tags({"mlflow.runName": f"resume-{target[:8]}", "resumed_run": target, "task": "resume"})
            pointer.nest_under(target)
    logged = tracking.last_step(target, f"{tracking.EPOCH_PREFIX}train/loss")
    with tracking.start_run(experiment=saved.experiment, run_name=run_name(saved), run_id=target) as run:
        run.set_tags({"resumed_from_epoch": state.epoch})
        return finish_part(train_part(run, saved, cohort, on_epoch=None, progress=progress, resume=state,
                                      logged=logged), progress=progress)


def _resume_target(cfg: TrainConfig, env_run: str | None) -> str:
    if cfg.resume and cfg.resume != "true":
        return cfg.resume
    if env_run and "checkpoint_epoch" in tracking.get_run(env_run).tags:  # `mlflow run --run-id ID -P resume=true`
        return env_run
    digest = config_digest(cfg)
    for r in tracking.find_runs(cfg.experiment, filter_string=f"tags.config_digest = '{digest}'"):
        if r.status != "FINISHED" and "checkpoint_epoch" in r.tags:
            return r.run_id
    raise ResumeError(f"no stopped run of this configuration (config digest {digest}) with a checkpoint in "
                      f"experiment {cfg.experiment!r}; pass its run id (--resume RUN_ID)")


def _saved_config(run_id: str, cfg: TrainConfig) -> TrainConfig:
    """The configuration the run was started with (its config.yaml), with how it executes taken from `cfg`."""
    import yaml

    run = tracking.get_run(run_id)
    if run.status == "FINISHED":
        raise ResumeError(f"run {run_id} finished; there is nothing to resume")
    if run.status == "RUNNING" and not tracking.reap([run]):
        raise ResumeError(f"run {run_id} is still running (its process is alive and beating); stop it first")
    with tracking.artifact_dir() as d:
        saved = yaml.safe_load(tracking.download_artifact(run_id, "config.yaml", d).read_text())
    keep = {k: getattr(cfg, k) for k in EXECUTION_FIELDS if k not in ("run_name", "resume")}
    return resolve(TrainConfig, {**saved, **keep, "resume": None})


def _checkpoint_of(run_id: str) -> FitState:
    local = checkpoint_dir(run_id) / CHECKPOINT
    if local.exists():
        return load_checkpoint(local)
    try:
        with tracking.artifact_dir() as d:
            return load_checkpoint(tracking.download_artifact(run_id, f"checkpoint/{CHECKPOINT}", d))
    except Exception:
        host = tracking.get_run(run_id).tags.get("checkpoint_host", "another host")
        raise ResumeError(f"run {run_id} has no checkpoint here: it stopped before its first checkpoint, or the "
                          f"checkpoint is on {host} (log_checkpoint=true puts it in the run's artifacts)") from None


def _recentre(pred: pd.DataFrame, threshold: float) -> pd.DataFrame:
    """Shift a fold's scores on the logit scale so its validation-chosen threshold lands at 0.5."""
    shift = logit(np.array([threshold]))[0]
    return pred.assign(probability=1 / (1 + np.exp(-(logit(pred["probability"].to_numpy()) - shift))))


def run_cv(cfg: TrainConfig, *, cohort: Cohort | None = None, progress: bool = True,
           parent_run_id: str | None = None) -> RunSummary:
    """Stratified group k-fold: a parent run with one child per fold and pooled out-of-fold metrics."""
    cohort = cohort or prepare_cohort(cfg, progress=progress)
    k = cfg.cv_folds
    folds = assign_folds(cohort.table, k, seed=cfg.split_seed, strata=cohort.strata, groups=cohort.groups)
    name = f"{run_name(cfg)}-cv{k}"
    with tracking.start_run(experiment=cfg.experiment, run_name=name, tags={**_tags(cfg, cohort), "cv_folds": str(k)},
                            parent_run_id=parent_run_id) as parent:
        _log_config(parent, cfg)
        children, pooled = [], []
        for i in range(k):
            summary = run_single(dataclasses.replace(cfg, cv_folds=0, seeds=1, run_name=f"{run_name(cfg)}-fold{i}"),
                                 cohort=cohort.with_split(fold_split(folds, i, k)), parent_run_id=parent.run_id,
                                 progress=progress, extra_tags={"fold": str(i)})
            children.append(summary)
            test = summary.predictions[summary.predictions["split"] == "test"]
            pooled.append(_recentre(test, summary.metrics["threshold"]).assign(fold=i, raw=test["probability"]))
        oof = pd.concat(pooled, ignore_index=True).assign(split="oof")
        report = build_report(oof, threshold=0.5, splits=("oof",), min_positives=cfg.min_positives,
                              bootstrap=cfg.bootstrap, seed=cfg.seed, prevalence=_prevalence(cfg, cohort),
                              argmax_split=None, subgroup_columns=cfg.subgroup_columns, decision=False)
        # calibration of the folds' own probabilities: the re-centred scores serve the metrics at a threshold only
        y, raw = oof["label"].to_numpy(), oof["raw"].to_numpy()
        metrics = {**report.metrics, "oof/brier": brier(y, raw), "oof/ece": ece(y, raw), **_spread(children)}
        parent.log_metrics(metrics)
        parent.set_tags(report.tags)
        parent.log_table(oof.assign(recentred=oof["probability"], probability=raw)[
            ["subject", "fold", "sex", "label", "probability", "recentred"]], "oof_predictions.csv")
        parent.log_table(report.per_sex, "per_sex.csv")
        parent.log_table(pd.DataFrame({"fold": folds.to_numpy(), "sex": cohort.table["sex"].to_numpy(),
                                       "label": cohort.labels}).value_counts().rename("images").reset_index()
                         .sort_values(["fold", "sex", "label"]), "folds.csv")
        return RunSummary(parent.run_id, name, metrics, None, children)


def _spread(children: list[RunSummary]) -> dict[str, float]:
    """Mean and standard deviation over child runs of the headline validation and test metrics."""
    out = {}
    for split, m in itertools.product(("val", "test"), METRICS):
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
        children = [run_single(dataclasses.replace(cfg, seeds=1, cv_folds=0, seed=s,
                                                   run_name=f"{run_name(cfg)}-seed{s}"),
                               cohort=cohort, parent_run_id=parent.run_id, progress=progress,
                               extra_tags={"seed": str(s)}) for s in range(cfg.seed, cfg.seed + cfg.seeds)]
        spread = _spread(children)
        parent.log_metrics(spread)
        return RunSummary(parent.run_id, name, spread, None, children)


def run_experiment(cfg: TrainConfig, *, progress: bool = True, on_epoch: EpochCallback | None = None,
                   parent_run_id: str | None = None) -> RunSummary:
    """The main job: a single run, CV folds or seed repeats, as the config asks. With CUSHING_PHASES_OUT set,
    where the time went (named phases, and when this process started) is written there as JSON."""
    cfg = dataclasses.replace(cfg, experiment=tracking.resolve_experiment(cfg.experiment))
    with timing() as timer:
        if cfg.resume:
            summary = resume_single(cfg, progress=progress)
        elif cfg.cv_folds > 1:
            summary = run_cv(cfg, progress=progress, parent_run_id=parent_run_id)
        elif cfg.seeds > 1:
            summary = run_seeds(cfg, progress=progress, parent_run_id=parent_run_id)
        else:
            summary = run_single(cfg, progress=progress, on_epoch=on_epoch, parent_run_id=parent_run_id)
    summary.phases = timer
    if os.environ.get(PHASES_OUT_ENV):
        timer.write(os.environ[PHASES_OUT_ENV], process_start=process_start_time(), run_id=summary.run_id,
                    train_seconds=summary.metrics.get("train_seconds"))
    return summary
