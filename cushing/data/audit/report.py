"""The audit of a cohort (`audit_manifest`) and its report (`CohortAudit`): the suspicious pairs, one row per
photo, and the counts a tracking step logs as metrics."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from cushing.data.audit.decisions import Decisions, read_decisions
from cushing.data.audit.pairing import _find_pairs, _pairs_frame, merged_groups
from cushing.data.audit.sameperson import ThresholdChoice
from cushing.data.audit.settings import OUTCOMES, PAIR_KINDS, AuditSettings
from cushing.data.audit.signatures import _photo_shas, photo_signatures
from cushing.data.manifest import Manifest, hash_subject, subject_key

__all__ = ["CohortAudit", "audit_manifest"]


@dataclass(frozen=True)
class CohortAudit:
    """`pairs` is audit.csv: one row per suspicious pair, PHI-safe (pair number, CSV lines, keyed subject hashes).

    A copy of a photo under another id appears twice, as `duplicate_photo` and as `same_person`: two questions.
    `detail` is `mirrored` for a flipped copy, `whole_image` for a same-person pair where a photo had no detected
    face (less reliable). `decision` is what the audit can say (settings.DECISIONS); `verdict` what a decisions
    file said; `outcome` the decision after it (`same` merges, `different` releases)."""

    pairs: pd.DataFrame  # pair, kind, distance, decision, verdict, outcome, line_a, line_b, subject_a, ...
    photos: pd.DataFrame  # one row per manifest row: line, subject, status, descriptor_source, detector
    settings: AuditSettings
    cached: int
    computed: int
    seconds: float
    choice: ThresholdChoice | None = None  # how the same-person threshold was chosen (None: faces not described)
    decisions: Decisions | None = None  # the reviewed decisions file that was applied

    def summary(self) -> dict[str, float]:
        """Counts a tracking step can log as metrics (finite numbers, no names)."""
        p, ph = self.pairs, self.photos
        out = {f"audit/{k}_pairs": float((p["kind"] == k).sum()) for k in PAIR_KINDS}
        if "straddles_splits" in p:
            out.update({f"audit/{k}_pairs_straddling": float(((p["kind"] == k) & p["straddles_splits"]).sum())
                        for k in PAIR_KINDS})
        out["audit/unreadable_photos"] = float((ph["status"] != "ok").sum())
        out.update(self._groups())
        different = p[~p["same_subject"]] if len(p) else p
        out.update({f"audit/pairs_{o}": float((different["outcome"] == o).sum()) for o in OUTCOMES})
        if self.settings.faces:
            ok = ph["status"] == "ok"
            out["audit/face_detected_rate"] = float((ph.loc[ok, "descriptor_source"] == "detected").mean()) \
                if ok.any() else 0.0
        out.update(self._threshold_metrics())
        if self.decisions is not None:
            out.update({f"audit/decisions_{v}": float(self.decisions.count(v)) for v in ("same", "different")})
            out["audit/decisions_unmatched"] = float(self.decisions.unmatched)
        return out

    def _groups(self) -> dict[str, float]:
        """Subjects joined to another as one person (merged) and only as a precaution, and the largest group kept
        in one split (>= 2 subject ids), in photos."""
        ph = self.photos
        groups = merged_groups(self.pairs, ph["subject"])  # hashed ids group the same way as raw ones
        merged = ph["subject"].nunique() - merged_groups(self.pairs, ph["subject"], outcomes=["merged"]).nunique()
        per = ph.groupby(groups).agg(photos=("subject", "size"), subjects=("subject", "nunique"))
        multi = per[per["subjects"] >= 2]
        largest = float(multi["photos"].max()) if len(multi) else 0.0
        return {"audit/merged_subjects": float(merged),
                "audit/precaution_subjects": float(ph["subject"].nunique() - groups.nunique() - merged),
                "audit/largest_group": largest, "audit/largest_group_share": largest / len(ph) if len(ph) else 0.0,
                "audit/largest_group_subjects": float(multi["subjects"].max()) if len(multi) else 0.0}

    def _threshold_metrics(self) -> dict[str, float]:
        c = self.choice
        if c is None:
            return {}
        out = {"audit/threshold": c.threshold, "audit/strict_distance": c.strict,
               "audit/expected_false_merges": c.expected_false_merges, "audit/threshold_auto": float(c.auto),
               "audit/guard_bound": float(c.guard_bound), "audit/group_limit": float(c.group_limit)}
        if c.auto:
            out["audit/threshold_curve"] = c.threshold_curve
        if np.isfinite(c.expected_false_pairs):  # the MLflow UI hides NaN metrics
            out["audit/expected_false_pairs"] = c.expected_false_pairs
            out["audit/expected_false_pairs_per_photo"] = c.expected_false_pairs / max(c.photos, 1)
        return out

    def params(self) -> dict[str, str]:
        """How the threshold was chosen and from what (file digests, no paths), for a run's params."""
        s, c = self.settings, self.choice
        out = {"audit_threshold": "auto" if s.same_person_max_distance is None else str(s.same_person_max_distance)}
        if c is not None:
            out["audit_threshold_rule"] = (
                f"auto: loosest curve distance with E <= {s.false_pairs_per_photo} x photos, mutual "
                f"{s.mutual_k}-NN kept together, guard max(floor({s.max_group_share} x photos), 3)" if c.auto
                else "fixed") + f"; merged below the loosest curve distance with E <= {s.certain_false_pairs}"
            out["audit_curve_sha256"] = c.curve_sha256
        if self.decisions is not None:
            out["audit_decisions_sha256"] = self.decisions.digest
        return out


def audit_manifest(manifest: Manifest | pd.DataFrame, *, settings: AuditSettings = AuditSettings(),
                   split: pd.Series | None = None, key: str | None = None, cache_dir: str | Path | None = None,
                   workers: int = 0, progress: bool = True) -> CohortAudit:
    """Audit a cohort: a `Manifest`, or a table in manifest row order with `path` (or absolute `image`) and
    `subject_id`. `split` (one per row) defaults to the table's split column; subject hashes are keyed with `key`,
    else the cohort's `subject_key` (the photos' content), as training keys them."""
    table = (manifest.table if isinstance(manifest, Manifest) else manifest).reset_index(drop=True)
    paths = table["path"] if "path" in table else table["image"]
    has_sha = "sha256" in table and table["sha256"].notna().all()
    shas = list(table["sha256"]) if has_sha else _photo_shas(list(paths))
    sig = photo_signatures(list(paths), settings, shas=shas, cache_dir=cache_dir, workers=workers, progress=progress)
    key = key or subject_key(shas)
    raw = table["subject_id"].astype(str)
    subjects = raw.map(lambda x: hash_subject(x, key))
    if split is None and "split" in table and (table["split"].astype(str).str.strip() != "").all():
        split = table["split"]
    split = None if split is None else pd.Series(split).reset_index(drop=True)
    decisions = read_decisions(settings.decisions, subjects.to_numpy()) if settings.decisions else None
    sex = table["sex"].astype(str).to_numpy() if "sex" in table else np.full(len(table), "")
    rows, choice = _find_pairs(sig, raw.to_numpy(), sex, settings, decisions.verdicts if decisions else {})
    pairs = _pairs_frame(rows, subjects, split)
    photos = pd.DataFrame({"line": np.arange(len(table)) + 2, "subject": subjects, "status": sig.status,
                           "descriptor_source": sig.source, "detector": sig.detector})
    return CohortAudit(pairs, photos, settings, sig.cached, sig.computed, sig.seconds, choice, decisions)
