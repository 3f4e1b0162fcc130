"""The audit of a cohort (`audit_manifest`) and its report (`CohortAudit`): the suspicious pairs, one row per
photo, and the counts a tracking step logs as metrics."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from cushing.data.audit.pairing import _find_pairs, _pairs_frame, merged_groups
from cushing.data.audit.settings import PAIR_KINDS, AuditSettings
from cushing.data.audit.signatures import _photo_shas, photo_signatures
from cushing.data.manifest import Manifest, hash_subject, subject_key

__all__ = ["CohortAudit", "audit_manifest"]


@dataclass(frozen=True)
class CohortAudit:
    """`pairs` is audit.csv: one row per suspicious pair, PHI-safe (CSV lines and keyed subject hashes only).

    A copy of a photo under another id appears twice, as `duplicate_photo` and as `same_person`: two questions.
    `detail` is `mirrored` for a flipped copy and `whole_image` for a same-person pair where a photo had no
    detected face (less reliable: the whole frame stood in for the face box).
    """

    pairs: pd.DataFrame  # kind, distance, line_a, line_b, subject_a, subject_b[, split_a, split_b, straddles_splits]
    photos: pd.DataFrame  # one row per manifest row: line, subject, status, descriptor_source, detector
    settings: AuditSettings
    cached: int
    computed: int
    seconds: float

    def summary(self) -> dict[str, float]:
        """Counts a tracking step can log as metrics (finite numbers, no names)."""
        p, ph = self.pairs, self.photos
        out = {f"audit/{k}_pairs": float((p["kind"] == k).sum()) for k in PAIR_KINDS}
        if "straddles_splits" in p:
            out.update({f"audit/{k}_pairs_straddling": float(((p["kind"] == k) & p["straddles_splits"]).sum())
                        for k in PAIR_KINDS})
        out["audit/unreadable_photos"] = float((ph["status"] != "ok").sum())
        groups = merged_groups(p, ph["subject"])  # hashed ids merge the same way as raw ones
        out["audit/merged_subjects"] = float(ph["subject"].nunique() - groups.nunique())
        out["audit/largest_merged_group"] = float(ph.groupby(groups)["subject"].nunique().max()) if len(ph) else 0.0
        if self.settings.faces:
            ok = ph["status"] == "ok"
            out["audit/face_detected_rate"] = float((ph.loc[ok, "descriptor_source"] == "detected").mean()) \
                if ok.any() else 0.0
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
    sig = photo_signatures(list(paths), settings, shas=shas, cache_dir=cache_dir, workers=workers,
                           progress=progress)
    key = key or subject_key(shas)
    raw = table["subject_id"].astype(str)
    subjects = raw.map(lambda x: hash_subject(x, key))
    if split is None and "split" in table and (table["split"].astype(str).str.strip() != "").all():
        split = table["split"]
    split = None if split is None else pd.Series(split).reset_index(drop=True)
    pairs = _pairs_frame(_find_pairs(sig, raw.to_numpy(), settings), subjects, split)
    photos = pd.DataFrame({"line": np.arange(len(table)) + 2, "subject": subjects, "status": sig.status,
                           "descriptor_source": sig.source, "detector": sig.detector})
    return CohortAudit(pairs, photos, settings, sig.cached, sig.computed, sig.seconds)
