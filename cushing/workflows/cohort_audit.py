"""The cohort before training: the audit as a tracked step (`cushing audit`, entry point `audit`), its threshold
evaluation, and what a cohort of this size can show (`cushing size`). Writes OUT/audit.csv (one row per pair, closest
first: pair number, kind, distance, decision, verdict, outcome, the two CSV lines, hashed subject ids, splits) and
OUT/audit_summary.csv (the threshold and the strict distance, how they were chosen, the expected false pairs, the
counts of merged and precaution pairs, the largest group kept in one split, how well recall is known per sex), and
logs both with the counts to a run tagged task=audit. No paths, raw ids or faces reach MLflow: the review page
(`review_page`) and the decisions file itself only with allow_phi_artifacts.
"""
from __future__ import annotations

import dataclasses
import shlex
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from cushing import tracking
from cushing.data.audit import (AuditSettings, CohortAudit, audit_manifest, audit_settings, evaluate_duplicates,
                                evaluate_same_person)
from cushing.data.audit.curvefile import write_curve
from cushing.data.audit.review import review_page
from cushing.data.manifest import load_manifest, sha256_file
from cushing.private import private_dir, write_private
from cushing.data.checks import resolve_data
from cushing.config import TrainConfig, resolve
from cushing.data.splits import SplitError, assign_splits
from cushing.stats.size import known_to, plan
from cushing.stats.subgroups import check_subgroup_columns

__all__ = ["AuditRun", "run_audit", "run_evaluation", "summary_table", "cohort_size", "size_line"]


@dataclass
class AuditRun:
    audit: CohortAudit
    out: Path
    run_id: str | None
    faces: bool  # whether the same-person check ran (not on a synthetic cohort, not with --no-faces)
    review_page: Path | None = None
    size: str = ""  # how well recall is known with the test patients per sex (`size_line`)


def summary_table(audit: CohortAudit) -> pd.DataFrame:
    """audit_summary.csv: key, value (the params, then the metrics): numbers and digests only."""
    return pd.DataFrame([*audit.params().items(), *audit.summary().items()], columns=["key", "value"])


def run_audit(*, manifest: str, out: str, faces: bool = True, threshold: str | float | None = "auto",
              decisions: str | None = None, curve: str | None = None, review: str | None = None,
              allow_phi: bool = False, workers: int = 0, cache_dir: str | None = None, experiment: str = "cushing",
              track: bool = True, progress: bool = True) -> AuditRun:
    """Audit a cohort; `threshold` is auto or a distance, `decisions` a reviewed CSV, `curve` a site's curve,
    `review` where to write the local review page (HTML with the photos)."""
    m = load_manifest(resolve_data(manifest))
    settings = audit_settings(m, threshold, decisions, curve, faces)
    audit = audit_manifest(m, settings=settings, cache_dir=cache_dir, workers=workers, progress=progress)
    folder = private_dir(out)  # the pairs name photos and subject ids
    audit.pairs.to_csv(folder / "audit.csv", index=False)
    size = size_line(m)
    summary = pd.concat([summary_table(audit), pd.DataFrame([("cohort_size", size)], columns=["key", "value"])])
    summary.to_csv(folder / "audit_summary.csv", index=False)
    page = Path(review) if review else None
    if page:
        private_dir(page.parent)
        # each photo as the manifest names it (image entry, subject id): what a reviewer looks up, not a resolved path
        captions = [f"{image} ({subject})" for image, subject in zip(m.table["image"], m.table["subject_id"])]
        write_private(page, review_page(audit.pairs, m.table["path"].tolist(), choice=audit.choice,
                                        manifest=str(m.source), captions=captions))
    run_id = _log(audit, m, experiment, summary, page if allow_phi else None, allow_phi) if track else None
    return AuditRun(audit, folder / "audit.csv", run_id, settings.faces, page, size)


def _log(audit: CohortAudit, m, experiment: str, summary: pd.DataFrame, page: Path | None, allow_phi: bool) -> str:
    s = audit.settings
    counts = audit.summary()
    with tracking.start_run(experiment=experiment, run_name="audit", tags={
            "task": "audit", "synthetic_data": str(m.synthetic).lower(), "data_digest": m.digest,
            "allow_phi_artifacts": str(allow_phi).lower(), "audit_merges": f"{counts['audit/merged_subjects']:.0f}",
            "audit_precautions": f"{counts['audit/precaution_subjects']:.0f}"}) as run:
        run.log_params({"duplicate_max_bits": s.duplicate_max_bits, "duplicate_max_color": s.duplicate_max_color,
                        "same_person_max_distance": audit.choice.threshold if audit.choice else "",
                        "faces": str(s.faces).lower(), **audit.params()})
        n = len(audit.photos)
        run.log_metrics({**counts, "audit/photos": float(n), "audit/seconds": audit.seconds,
                         "audit/photos_per_s": n / max(audit.seconds, 1e-9), "audit/computed": float(audit.computed)})
        run.log_table(audit.pairs, "audit.csv")
        run.log_table(summary, "audit_summary.csv")
        if allow_phi and audit.decisions is not None:  # a person's notes may name people: PHI
            run.log_table(pd.read_csv(audit.decisions.path, dtype=str), "review/decisions.csv")
        if page is not None:
            with tracking.artifact_dir() as d:
                (d / page.name).write_text(page.read_text())
                run.log_files(d, "review")
        return run.run_id


def run_evaluation(*, manifest: str, out: str, photos: int = 2000, dup_photos: int = 300, seed: int = 0,
                   workers: int = 0, cache_dir: str | None = None, command: str = "") -> tuple[pd.DataFrame, dict]:
    """Precision and recall of "same person" by threshold and sex (Wilson intervals), the same-person curve the
    automatic threshold reads (OUT/same_person_curve.csv, the shipped file's format), and the duplicate
    detector's false pairs and copy drift, on a manifest whose subject ids are true identities (e.g. CelebA)."""
    ev = evaluate_same_person(manifest, n_photos=photos, seed=seed, cache_dir=cache_dir, workers=workers)
    dup = evaluate_duplicates(manifest, n_photos=dup_photos, seed=seed, cache_dir=cache_dir, workers=workers)
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    ev.table.to_csv(folder / "same_person_thresholds.csv", index=False)
    dup["copies"].to_csv(folder / "duplicate_copies.csv", index=False)
    curve = write_curve(ev.curve, folder / "same_person_curve.csv", fingerprint=ev.fingerprint or {},
                        cohort=f"{Path(manifest).name}: {'all photos' if photos <= 0 else f'{photos} photos'} "
                               f"(seed {seed})", manifest_sha256=sha256_file(manifest), photos=ev.photos,
                        identities=ev.identities, flip_average=AuditSettings().flip_average,
                        command=command or f"cushing audit --evaluate --manifest {shlex.quote(manifest)} --photos "
                                           f"{photos}")
    return ev.table, {**{k: v for k, v in dup.items() if k != "copies"}, "same_person_photos": ev.photos,
                      "identities": ev.identities, "detected_rate": ev.detected_rate, "curve": str(curve),
                      "defaults": dataclasses.asdict(AuditSettings())}


def _subjects(m, cfg: TrainConfig) -> pd.DataFrame:
    """One row per subject: label, the split a run with `cfg` gives it (the manifest's own, else drawn), columns."""
    t = m.table.assign(split=assign_splits(m.table, cfg.ratios, seed=cfg.split_seed, strata=cfg.strata_columns))
    g = t.groupby("subject_id")
    return pd.DataFrame({"label": g["label"].max(), "split": g["split"].first(),
                         **{c: g[c].first() for c in dict.fromkeys(("sex", *cfg.subgroup_columns))}})


def cohort_size(*, manifest: str, sensitivity: float, specificity: float, auc: float, width: float,
                split_ratios: str = "1:1:1", split_seed: int = 0, subgroups: str = "sex") -> pd.DataFrame:
    """`stats.size.plan` for a manifest, in subjects, split as a run with these settings would split it."""
    cfg = resolve(TrainConfig, {"split_ratios": split_ratios, "split_seed": split_seed, "subgroups": subgroups})
    m = load_manifest(resolve_data(manifest))
    check_subgroup_columns(m.table, cfg.subgroup_columns)
    subjects = _subjects(m, cfg)
    if not (subjects["split"] == "test").any():
        raise ValueError(f"{m.source}: split_ratios {split_ratios} leave no subject in the test split")
    return plan(subjects, test_fraction=float((subjects["split"] == "test").mean()), sensitivity=sensitivity,
                specificity=specificity, auc=auc, width=width, columns=cfg.subgroup_columns)


def size_line(m, cfg: TrainConfig | None = None) -> str:
    """`stats.size.known_to` for a manifest's test patients per sex (default split settings)."""
    try:
        s = _subjects(m, cfg or TrainConfig())
    except SplitError as e:  # a given split that leaks: the audit says so; nothing to plan from
        return f"not estimated ({e})"
    test = s[(s["split"] == "test") & (s["label"] == 1)].groupby("sex").size()
    return known_to({{"F": "female", "M": "male"}[k]: int(test.get(k, 0)) for k in sorted(s["sex"].unique())})
