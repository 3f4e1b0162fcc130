"""The cohort audit as a tracked step (`cushing audit`, entry point `audit`), and its threshold evaluation.

Writes OUT/audit.csv (one row per suspicious pair: kind, distance, the two CSV lines, hashed subject ids, splits)
and logs it with the counts to a run tagged task=audit. No paths, raw ids or faces reach MLflow.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from cushing import tracking
from cushing.data.audit import AuditSettings, CohortAudit, audit_manifest, audit_settings, evaluate_duplicates, \
    evaluate_same_person
from cushing.data.manifest import load_manifest
from cushing.model.train import resolve_data

__all__ = ["AuditRun", "run_audit", "run_evaluation"]


@dataclass
class AuditRun:
    audit: CohortAudit
    out: Path
    run_id: str | None
    faces: bool  # whether the same-person check ran (not on a synthetic cohort, not with --no-faces)


def run_audit(*, manifest: str, out: str, faces: bool = True, workers: int = 0, cache_dir: str | None = None,
              experiment: str = "cushing", track: bool = True, progress: bool = True) -> AuditRun:
    m = load_manifest(resolve_data(manifest))
    settings = audit_settings(m)
    if not faces:
        settings = dataclasses.replace(settings, faces=False)
    audit = audit_manifest(m, settings=settings, cache_dir=cache_dir, workers=workers, progress=progress)
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    audit.pairs.to_csv(folder / "audit.csv", index=False)
    run_id = _log(audit, m, experiment) if track else None
    return AuditRun(audit, folder / "audit.csv", run_id, settings.faces)


def _log(audit: CohortAudit, m, experiment: str) -> str:
    s = audit.settings
    with tracking.start_run(experiment=experiment, run_name="audit", tags={
            "task": "audit", "synthetic_data": str(m.synthetic).lower(), "data_digest": m.digest}) as run:
        run.log_params({"duplicate_max_bits": s.duplicate_max_bits, "duplicate_max_color": s.duplicate_max_color,
                        "same_person_max_distance": s.same_person_max_distance, "faces": str(s.faces).lower()})
        n = len(audit.photos)
        run.log_metrics({**audit.summary(), "audit/photos": float(n), "audit/seconds": audit.seconds,
                         "audit/photos_per_s": n / max(audit.seconds, 1e-9), "audit/computed": float(audit.computed)})
        run.log_table(audit.pairs, "audit.csv")
        return run.run_id


def run_evaluation(*, manifest: str, out: str, photos: int = 2000, dup_photos: int = 300, seed: int = 0,
                   workers: int = 0, cache_dir: str | None = None) -> tuple[pd.DataFrame, dict]:
    """Precision and recall of "same person" by threshold and sex (Wilson intervals), and the duplicate detector's
    false pairs and copy drift, on a manifest whose subject ids are true identities (e.g. CelebA)."""
    ev = evaluate_same_person(manifest, n_photos=photos, seed=seed, cache_dir=cache_dir, workers=workers)
    dup = evaluate_duplicates(manifest, n_photos=dup_photos, seed=seed, cache_dir=cache_dir, workers=workers)
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    ev.table.to_csv(folder / "same_person_thresholds.csv", index=False)
    dup["copies"].to_csv(folder / "duplicate_copies.csv", index=False)
    return ev.table, {**{k: v for k, v in dup.items() if k != "copies"}, "same_person_photos": ev.photos,
                      "identities": ev.identities, "detected_rate": ev.detected_rate,
                      "defaults": dataclasses.asdict(AuditSettings())}
