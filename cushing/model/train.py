"""Core training: cohort -> trained model, predictions table, operating threshold. No logging; the only files are
the content-addressed caches (the drawn demo cohort, the cohort audit's hashes and descriptors).

The data DAG: manifest (validated, digested) -> split (grouped, stratified) -> decoded uint8 bank -> training.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import pandas as pd
import torch

from cushing.model.backbones import BackboneSpec, Preprocess, build_model, get_spec, interpolation_of, preprocess_of
from cushing.config import ConfigError, TrainConfig
from cushing.model.augment import DeviceAugment
from cushing.data.bank import ImageBank, decode_images
from cushing.devices import training_device
from cushing.model.engine import (CheckpointCallback, EpochCallback, FitResult, FitSettings, FitState, fit,
                                  predict_proba, proba_of_logits)
from cushing.data.manifest import Manifest, hash_subject, load_manifest
from cushing.data.checks import check_cohort, resolve_data
from cushing.data.splits import assign_splits, split_table
from cushing.stats.calibration import apply_temperature, fit_temperature
from cushing.stats.intervals import photos_repeat
from cushing.stats.thresholds import OperatingPoint, operating_point
from cushing.data.audit import audit_manifest, audit_settings, merged_groups
from cushing.data.audit.settings import TOGETHER
from cushing.phases import phase

__all__ = ["Cohort", "TrainOutcome", "prepare_cohort", "train", "predictions_frame", "AuditError", "Fitted",
           "fit_model", "score"]


@dataclass
class Cohort:
    """A validated manifest with its split and decoded images (decoded once, shared by folds and seeds), and the
    cohort audit that shaped the split (None when audit=off)."""

    manifest: Manifest
    split: pd.Series
    images: torch.Tensor  # uint8 [N, 3, S, S] on the CPU
    img_size: int
    interpolation: str
    audit: Any = None  # audit.CohortAudit: suspicious pairs (hashed ids, CSV lines)
    merges: int = 0  # subject ids joined to another's split group as one person (the audit's merged pairs)
    precautions: int = 0  # subject ids joined to another's split group only as a precaution (pairs for review)
    subgroups: tuple[str, ...] = ("sex",)
    strata: tuple[str, ...] = ("label", "sex")
    groups: pd.Series | None = None  # per image: the unit kept whole by splits and folds (None: the subject)

    @property
    def table(self) -> pd.DataFrame:
        return self.manifest.table

    @property
    def labels(self) -> np.ndarray:
        return self.table["label"].to_numpy()

    def index(self, split: str) -> np.ndarray:
        return np.flatnonzero((self.split == split).to_numpy())

    def split_table(self) -> pd.DataFrame:
        return split_table(self.table, self.split)

    def with_split(self, split: pd.Series) -> "Cohort":
        return dataclasses.replace(self, split=split)


class AuditError(ValueError):
    """audit=strict and the cohort audit merged pairs of different subject ids (the same picture, or the same
    person as nearly certain as the audit can say); the message lists them by CSV line."""


def _audit(cfg: TrainConfig, manifest: Manifest, progress: bool):
    """The cohort audit before splitting: (audit, split groups or None, merges, precautions). Merged and precaution
    pairs of different subjects share one split group (a drawn split stays leak-free by person); strict refuses
    merged pairs and keeps precaution pairs together as warn does (the audit only suspects those)."""
    settings = audit_settings(manifest, cfg.audit_threshold, cfg.audit_decisions, cfg.audit_curve)
    audit = audit_manifest(manifest, settings=settings, progress=progress)
    pairs = audit.pairs[~audit.pairs["same_subject"] & audit.pairs["outcome"].isin(TOGETHER)]
    merged = pairs[pairs["outcome"] == "merged"]
    if cfg.audit == "strict" and len(merged):
        lines = manifest.lines  # CSV lines: the table's rows once photos are skipped are not
        listed = "\n  ".join(f"pair {r.pair}, lines {lines[r.line_a - 2]} and {lines[r.line_b - 2]}: {r.kind} "
                             f"(distance {r.distance:.3f})" for r in merged.itertuples())
        raise AuditError(f"{manifest.source}: the cohort audit (audit=strict) merged {len(merged)} pair(s) of "
                         f"different subject ids as one photo or one person:\n  {listed}\nfix the subject ids, "
                         f"mark a pair different in audit_decisions, or train with audit=warn")
    if pairs.empty:
        return audit, None, 0, 0
    groups = merged_groups(pairs, manifest.table["subject_id"])
    if "split" in manifest.table.columns:  # the manifest's own split is used as given: nothing was merged
        return audit, groups, 0, 0
    counts = audit.summary()
    return audit, groups, int(counts["audit/merged_subjects"]), int(counts["audit/precaution_subjects"])


def prepare_cohort(cfg: TrainConfig, *, manifest: Manifest | None = None, progress: bool = True) -> Cohort:
    with phase("data: manifest"):
        manifest = manifest or load_manifest(resolve_data(cfg.data), skip_bad_photos=cfg.skip_bad_photos)
        check_cohort(cfg, manifest)  # before the audit reads a photo
        if len(manifest.skipped) and cfg.audit_decisions:
            raise ConfigError(f"{cfg.audit_decisions} names manifest lines, which no longer match once photos are "
                             "skipped: fix the photos, or train without audit_decisions")
    with phase("data: cohort audit"):
        audit, groups, merges, precautions = _audit(cfg, manifest, progress) if cfg.audit != "off" else \
            (None, None, 0, 0)
    with phase("data: split"):
        if groups is not None:
            check_cohort(cfg, manifest, groups)  # the split as drawn: subjects the audit merged stay together
        split = assign_splits(manifest.table, cfg.ratios, seed=cfg.split_seed, strata=cfg.strata_columns,
                              groups=groups)
    with phase("backbone registry: timm import, pretrained config"):
        # interpolation is a property of the backbone's pretrained config; read it without building weights
        interp = interpolation_of(cfg.model)
    with phase("data: decode images"):
        images = decode_images(manifest.table["path"].tolist(), cfg.img_size, interp, cfg.decode_workers,
                               progress=progress)
    return Cohort(manifest, split, images, cfg.img_size, interp, audit, merges, precautions, cfg.subgroup_columns,
                  cfg.strata_columns, groups)


@dataclass
class _Trained:
    config: TrainConfig
    spec: BackboneSpec
    frozen: bool
    model: torch.nn.Module  # best-epoch weights, eval mode
    preprocess: Preprocess
    fit: FitResult


@dataclass
class TrainOutcome(_Trained):
    predictions: pd.DataFrame  # subject (hashed), split, sex, label, probability, logit, prediction
    threshold: float
    temperature: float
    device: str
    operating: OperatingPoint | None = None  # the threshold's rule and what it guarantees


def predictions_frame(cohort: Cohort, idx: np.ndarray, split_names: np.ndarray, prob: np.ndarray,
                      logit: np.ndarray) -> pd.DataFrame:
    t = cohort.table.iloc[idx]
    extra = {c: t[c].astype(str).to_numpy() for c in cohort.subgroups if c != "sex"}
    key = cohort.manifest.subject_key
    return pd.DataFrame({
        "subject": [hash_subject(s, key) for s in t["subject_id"]],
        "split": split_names, "sex": t["sex"].to_numpy(), **extra, "label": t["label"].to_numpy(),
        "probability": prob, "logit": logit,
    })


def fit_settings(cfg: TrainConfig, frozen: bool, progress: bool, desc: str) -> FitSettings:
    return FitSettings(epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr, momentum=cfg.momentum,
                       weight_decay=cfg.weight_decay, oversample=cfg.oversample, aug_strength=cfg.aug_strength,
                       aug_views=cfg.aug_views, seed=cfg.seed, frozen=frozen, select_metric=cfg.select_metric,
                       patience=cfg.patience, progress=progress, desc=desc, compile=cfg.compile,
                       checkpoint_every=cfg.checkpoint_every, checkpoint_seconds=60.0 * cfg.checkpoint_minutes)


@dataclass
class Fitted(_Trained):
    """A finished training loop, not yet scored: the best-epoch model and what scoring it needs. Scoring (and
    everything after it) can run later or on another thread; the images stay on the device until then."""

    bank: ImageBank | None  # None once scored
    aug: DeviceAugment
    device: torch.device


def fit_model(cfg: TrainConfig, cohort: Cohort, *, on_epoch: EpochCallback | None = None, progress: bool = True,
              model_factory: Callable[..., torch.nn.Module] = build_model, resume: FitState | None = None,
              on_checkpoint: CheckpointCallback | None = None) -> Fitted:
    """The training loop of one configuration on a prepared cohort (continuing from `resume`, a checkpointed
    FitState, when given); the model holds the best validation epoch's weights on return."""
    with phase("model build"):
        spec, frozen, device = get_spec(cfg.model), cfg.frozen, training_device(cfg.device)
        torch.manual_seed(cfg.seed)
        model = model_factory(cfg.model, pretrained=cfg.pretrained, weights=cfg.weights, img_size=cfg.img_size,
                              freeze=frozen).to(device)
        if spec.channels_last and device.type == "cuda":
            model = model.to(memory_format=torch.channels_last)
        pre = preprocess_of(model, cfg.img_size)
        bank = ImageBank(cohort.images, device, cfg.memory_budget_gb * 2**30)
        aug = DeviceAugment(pre, device, cfg.aug_strength, spec.channels_last and device.type == "cuda")
    tr, va = cohort.index("train"), cohort.index("val")
    desc = f"{cfg.model}{'-frozen' if frozen else ''}"
    with phase("training loop"):
        result = fit(model, bank, cohort.labels, tr, va, aug, fit_settings(cfg, frozen, progress, desc), on_epoch,
                     resume=resume, on_checkpoint=on_checkpoint)
    model.eval()
    return Fitted(cfg, spec, frozen, model, pre, result, bank, aug, device)


def score(fitted: Fitted, cohort: Cohort) -> TrainOutcome:
    """Score the best-epoch model on the validation and test splits, calibrate (if asked) and choose the
    operating threshold on validation. Releases the device images."""
    cfg = fitted.config
    va, te = cohort.index("val"), cohort.index("test")
    scored = np.concatenate([va, te])
    kept = fitted.fit.val_logits
    if kept is not None and len(kept) == len(va):
        # the best epoch's validation pass already scored val with these weights: only test is new
        val_prob, val_logit = proba_of_logits(kept)
        test_prob, test_logit = predict_proba(fitted.model, fitted.bank, te, fitted.aug)
        prob, logit = np.concatenate([val_prob, test_prob]), np.concatenate([val_logit, test_logit])
    else:
        prob, logit = predict_proba(fitted.model, fitted.bank, scored, fitted.aug)
    names = np.array(["val"] * len(va) + ["test"] * len(te))
    pred = predictions_frame(cohort, scored, names, prob, logit)
    temperature = 1.0
    if cfg.calibrate:
        is_val = pred["split"] == "val"
        temperature = fit_temperature(pred.loc[is_val, "label"], pred.loc[is_val, "probability"])
        pred["probability"] = apply_temperature(pred["probability"].to_numpy(), temperature)
    op = operating_point(pred[pred["split"] == "val"], cfg.threshold, n_boot=cfg.bootstrap, seed=cfg.seed,
                         repeats=photos_repeat(pred))  # the interval method the report uses
    pred["prediction"] = (pred["probability"] >= op.threshold).astype(int)
    fitted.bank = None  # the device copy of the images is no longer needed
    return TrainOutcome(cfg, fitted.spec, fitted.frozen, fitted.model, fitted.preprocess, fitted.fit, pred,
                        op.threshold, temperature, str(fitted.device), op)


def train(cfg: TrainConfig, cohort: Cohort, *, on_epoch: EpochCallback | None = None, progress: bool = True,
          model_factory: Callable[..., torch.nn.Module] = build_model, resume: FitState | None = None,
          on_checkpoint: CheckpointCallback | None = None) -> TrainOutcome:
    """Train one configuration on a prepared cohort and score its validation and test splits (continuing from
    `resume`, a checkpointed FitState, when given)."""
    fitted = fit_model(cfg, cohort, on_epoch=on_epoch, progress=progress, model_factory=model_factory,
                       resume=resume, on_checkpoint=on_checkpoint)
    with phase("scoring (val, test)"):
        return score(fitted, cohort)
