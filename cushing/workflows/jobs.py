"""Work on models that already exist: Grad-CAM for a run or a registered model, external validation, paired
comparison of runs. Composes the pure modules with tracking (runs) and release (models); no mlflow import here.
"""
from __future__ import annotations

import base64
import itertools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from cushing import release, tracking
from cushing.model.explain import CamReport, explain_images, landmarks_of
from cushing.data.manifest import Manifest, hash_subject, load_manifest
from cushing.stats import plots
from cushing.stats.calibration import apply_temperature
from cushing.stats.paired import delong_test, holm, mcnemar_test
from cushing.stats.report import Report, build_report
from cushing.data.checks import resolve_data
from cushing.config import ConfigError, parse_bool
from cushing.model.backbones import Preprocess
from cushing.model.augment import DeviceAugment
from cushing.data.bank import decode_images, ImageBank
from cushing.devices import pick_device
from cushing.model.engine import predict_proba

__all__ = ["run_explain", "run_evaluate", "compare_runs", "CompareError", "ComparisonResult"]


def _rows_for(manifest: Manifest, split: str, own_run: str | None) -> np.ndarray:
    """Which rows to use: every row for `all`; on the cohort `own_run` trained on, that run's own split (each
    subject where its predictions.csv put it, train when it is not there: drawing the split again could differ,
    with other strata or around subjects the audit merged); else the manifest's split column; else every row (an
    external cohort)."""
    table = manifest.table
    if split == "all":
        return np.arange(len(table))
    if own_run:
        where = dict(zip(*_predictions(own_run)[["subject", "split"]].to_numpy().T))
        return np.flatnonzero(manifest.subject_hashes().map(lambda h: where.get(h, "train")).to_numpy() == split)
    if "split" in table.columns:
        return np.flatnonzero((table["split"] == split).to_numpy())
    return np.arange(len(table))


def run_explain(*, run_id: str | None = None, model_uri: str | None = None, manifest: str | None = None,
                split: str = "test", allow_phi: bool = False, experiment: str = "cushing",
                device: str = "auto") -> tuple[str, CamReport]:
    """Grad-CAM aggregates for an existing run (logged into it) or a registered model (a new run). On the cohort
    the model trained on, the split is the training run's own, found from the model when only it is given."""
    params, digest = None, None
    if run_id:
        run = tracking.get_run(run_id)
        params, digest = dict(run.params), run.tags.get("data_digest")
        model_uri = model_uri or run.tags.get("model_uri")
        if not model_uri:
            raise ConfigError(f"run {run_id} has no logged model (log_model=false?); pass --model")
    if not model_uri:
        raise ConfigError("give --run-id or --model")
    data = manifest or (params or {}).get("data")
    if not data:
        raise ConfigError("give --manifest (the images to explain)")
    m = load_manifest(resolve_data(data), skip_bad_photos=parse_bool((params or {}).get("skip_bad_photos", False)))
    if run_id and digest != m.digest:
        raise ConfigError(f"{data} is not the cohort run {run_id} trained on (data digest {m.digest[:12]}, the run's "
                          f"{str(digest)[:12]}): its maps would replace the run's own; explain it with --model "
                          f"{model_uri} instead (a new run)")
    model, mcfg = release.load_torch_model(model_uri)
    own = run_id or (release.source_run(model_uri) if mcfg.get("data_digest") == m.digest else None)
    idx = _rows_for(m, split, own)
    model = model.to(dev := pick_device(device))
    size = int(mcfg["img_size"])
    images = decode_images(m.table["path"].iloc[idx].tolist(), size, mcfg.get("interpolation", "bicubic"))
    aug = DeviceAugment(Preprocess.from_model_config(mcfg), dev, 0.0)
    prob, _ = predict_proba(model, ImageBank(images, dev, 2**34), np.arange(len(images)), aug)
    prob = apply_temperature(prob, float(mcfg.get("temperature", 1.0)))
    x = aug.normalize(images.to(dev)).contiguous()
    t = m.table.iloc[idx]
    with tracking.artifact_dir() as d:
        report = explain_images(
            model, mcfg["model"], x, images_u8=images.numpy(), labels=t["label"].to_numpy(),
            preds=(prob >= float(mcfg["threshold"])).astype(int), sexes=t["sex"].to_numpy(),
            subjects=[hash_subject(s, m.subject_key) for s in t["subject_id"]], out_dir=d, allow_phi=allow_phi,
            landmarks=landmarks_of(m.table, idx, size))
        with tracking.resume_run(run_id) if run_id else tracking.start_run(
                experiment=experiment, run_name=f"explain-{mcfg['model']}", tags={
                    "task": "explain", "source_model_uri": model_uri, "synthetic_data": str(m.synthetic).lower()}) as r:
            r.log_files(d)
            r.log_metrics(report.metrics)
            r.set_tags(report.tags)
            return r.run_id, report


@dataclass
class EvaluationResult:
    run_id: str
    report: Report
    predictions: pd.DataFrame
    excluded: dict[str, int]  # photos not scored, by face_status (no_face, multiple_faces, ...)


def _score_with_pyfunc(model, paths: list[str], batch: int = 32) -> pd.DataFrame:
    outs = []
    for i in range(0, len(paths), batch):
        payload = [base64.b64encode(Path(p).read_bytes()).decode() for p in paths[i:i + batch]]
        outs.append(model.predict(pd.DataFrame({"image": payload})))
    return pd.concat(outs, ignore_index=True)


def run_evaluate(*, model_uri: str, manifest: str, experiment: str = "cushing", min_positives: int = 5,
                 bootstrap: int = 2000, seed: int = 0, prevalence: float | None = None) -> EvaluationResult:
    """External validation: score a cohort with the served pyfunc (same face stage, stored threshold) and log the
    same metrics, intervals, per-sex table and calibration as a new run linked to the model."""
    m = load_manifest(resolve_data(manifest))
    pyf = release.load_model(model_uri)
    meta = (pyf.metadata.metadata or {}).get("cushing", {})
    if meta.get("data_digest") == m.digest:
        raise ConfigError(f"{manifest} is the cohort {model_uri} was trained on (data digest {m.digest[:12]}): "
                          "external validation needs other patients; its own test split is in its training run")
    threshold = float(meta.get("threshold", 0.5))
    out = _score_with_pyfunc(pyf, m.table["path"].tolist())
    t = m.table
    pred = pd.DataFrame({"subject": [hash_subject(s, m.subject_key) for s in t["subject_id"]], "split": "external",
                         "sex": t["sex"].to_numpy(), "label": t["label"].to_numpy(),
                         "probability": pd.to_numeric(out["probability"]).to_numpy(float),
                         "face_status": out["face_status"].to_numpy()})
    scored = pred[pred["probability"].notna()].copy()
    scored["prediction"] = (scored["probability"] >= threshold).astype(int)
    report = build_report(scored, threshold=threshold, splits=("external",), min_positives=min_positives,
                          bootstrap=bootstrap, seed=seed, prevalence=prevalence, argmax_split=None)
    version = release.model_version_of(model_uri)
    tags = {"task": "external_validation", "source_model_uri": model_uri, "data_digest": m.digest,
            "synthetic_data": str(m.synthetic).lower(), **({"model_version": version} if version else {}),
            **report.tags}
    with tracking.start_run(experiment=experiment, run_name=f"evaluate-{meta.get('model', 'model')}", tags=tags) as r:
        r.log_params({"model_uri": model_uri, "threshold": threshold, "min_positives": min_positives,
                      "bootstrap": bootstrap, "prevalence": "" if prevalence is None else prevalence})
        r.log_metrics({**report.metrics, "external/unscored": float(pred["probability"].isna().sum())})
        r.log_table(scored[["subject", "split", "sex", "label", "probability", "prediction"]], "predictions.csv")
        r.log_table(report.per_sex, "per_sex.csv")
        r.log_table(report.decision_curve, "decision_curve.csv")
        r.log_table(pred["face_status"].value_counts().rename_axis("face_status").reset_index(), "face_status.csv")
        with tracking.artifact_dir() as d:
            plots.calibration_plot(report.reliability, d / "calibration.png")
            plots.decision_plot({"model": report.decision_curve}, {"model": (threshold, report.metrics.get(
                "external/net_benefit", float("nan")))}, d / "decision_curve.png", "decision curve (external)")
            r.log_files(d, "plots")
        ds = scored[["subject", "sex", "label"]].assign(split="external")
        r.log_dataset(ds, digest=m.digest, name="external-cohort", context="evaluation")
        if version:
            release.link_evaluation(model_uri, r.run_id)
        excluded = pred.loc[pred["probability"].isna(), "face_status"].value_counts()
        return EvaluationResult(r.run_id, report, scored, {str(k): int(v) for k, v in excluded.items()})


class CompareError(ValueError):
    pass


@dataclass
class ComparisonResult:
    table: pd.DataFrame
    run_id: str | None


def _predictions(run_id: str) -> pd.DataFrame:
    """A run's predictions.csv: hashed subject, split, sex, label and probability of each photo it scored."""
    with tracking.artifact_dir() as d:
        return pd.read_csv(tracking.download_artifact(run_id, "predictions.csv", d))


def _test_predictions(run_id: str) -> tuple[pd.DataFrame, float, str]:
    """The run's test subjects, one row each (label, mean probability of its photos, photos), by hashed id."""
    run = tracking.get_run(run_id)
    test = _predictions(run_id).query("split == 'test'")
    per_subject = test.groupby("subject", sort=True).agg(label=("label", "first"), probability=("probability", "mean"),
                                                         photos=("label", "size")).reset_index()
    return per_subject, float(run.metrics.get("threshold", 0.5)), run.tags.get("mlflow.runName", run_id)


def compare_runs(run_ids: list[str], *, log_to: str | None = None, experiment: str = "cushing") -> ComparisonResult:
    """Paired tests on the same test subjects, one case each (the mean probability of its photos: photographing a
    patient again adds no evidence): DeLong for AUC, McNemar at each model's own threshold, Holm."""
    if len(run_ids) < 2:
        raise CompareError("compare needs at least two runs")
    loaded = {rid: _test_predictions(rid) for rid in run_ids}
    ref_id = run_ids[0]
    ref = loaded[ref_id][0]
    for rid, (pred, _, name) in loaded.items():
        if len(pred) != len(ref) or not (pred["subject"].to_numpy() == ref["subject"].to_numpy()).all() \
                or not (pred["label"].to_numpy() == ref["label"].to_numpy()).all():
            raise CompareError(f"run {rid} ({name}) was evaluated on different test subjects than run {ref_id}: "
                               "paired tests need the same cohort and split (same data digest and split seed)")
    rows = []
    for a, b in itertools.combinations(loaded, 2):
        (pa, ta, na), (pb, tb, nb) = loaded[a], loaded[b]
        y = pa["label"].to_numpy()
        d = delong_test(y, pa["probability"].to_numpy(), pb["probability"].to_numpy())
        ca = (pa["probability"].to_numpy() >= ta).astype(int) == y
        cb = (pb["probability"].to_numpy() >= tb).astype(int) == y
        mc = mcnemar_test(ca, cb)
        rows.append({"run_a": a, "model_a": na, "run_b": b, "model_b": nb, "n": len(y),
                     "photos": int(pa["photos"].sum()),
                     "auc_a": d["auc1"], "auc_b": d["auc2"], "auc_diff": d["diff"], "delong_z": d["z"],
                     "delong_p": d["p_value"], "acc_a": ca.mean(), "acc_b": cb.mean(), "mcnemar_b": mc["b"],
                     "mcnemar_c": mc["c"], "mcnemar_p": mc["p_value"]})
    table = pd.DataFrame(rows)
    table["delong_p_holm"] = holm(table["delong_p"].tolist())
    table["mcnemar_p_holm"] = holm(table["mcnemar_p"].tolist())
    if log_to is None:
        return ComparisonResult(table, None)
    with tracking.log_into(log_to or None, experiment=experiment, run_name="compare",
                           tags={"task": "compare", "compared_runs": ",".join(run_ids)}) as r:
        r.log_table(table, "comparison.csv")
        return ComparisonResult(table, r.run_id)
