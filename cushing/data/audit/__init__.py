"""Cohort audit: the same photo twice, and the same person under two subject ids.

Either defeats the subject-grouped split (a re-saved training photo in the test set; one patient entered under two
ids) and the manifest's byte-level duplicate check cannot see it. Values only: no MLflow, no files beyond its
content-addressed cache (per photo sha256, atomic JSON, so a rerun decodes nothing). Outputs carry CSV lines and
keyed subject hashes, never paths or raw ids.

- **Duplicate photos**: a 256-bit DCT perceptual hash (64x64 gray, lowest 16x16 coefficients vs their median), by
  Hamming distance, also against each photo's mirror. The 64-bit pHash is not enough: aligned faces share their low
  frequencies; on CelebA distinct people came within 4 bits while a re-encoded copy drifted by 6.
- **Same person**: dlib's 128-d descriptor (HOG with upsampling, mmod CNN fallback, else the whole image, recorded as
  `whole_image`; 68-point alignment; photo and mirror averaged); pairs of different ids closer than a threshold
  chosen for the cohort (`threshold`) or given, each with a decision that claims no more than the audit knows:
  `merged`, `precaution`, `review`, `below_threshold`; a decisions file marks pairs `same` or `different`.
- `merged_groups` turns pairs into group ids so a splitter keeps merged and precaution subjects in one split.

Owns: `settings`, `hashing`, `descriptors`, `signatures` (per photo, on a process pool, cached by content),
`threshold`, `sameperson`, `decisions`, `pairing`, `report`, `review` (the HTML review page), `evaluation` and
`curvefile` (the measured same-person curve). May import `cushing.data.manifest`, `.imageio`, `.weights`,
`cushing.stats` and `cushing.config`; neither torch nor mlflow; dlib only where a describer is made.
"""
from __future__ import annotations

from cushing.data.audit.descriptors import FaceDescriber, FaceDescriptor, descriptor_pairs
from cushing.data.audit.evaluation import SamePersonEvaluation, evaluate_duplicates, evaluate_same_person
from cushing.data.audit.hashing import color_distance, color_thumbnail, duplicate_pairs, hamming_pairs, perceptual_hash
from cushing.data.audit.pairing import merged_groups
from cushing.data.audit.report import CohortAudit, audit_manifest
from cushing.data.audit.settings import PAIR_KINDS, AuditSettings, audit_settings
from cushing.data.audit.signatures import SignatureCache, Signatures, photo_signatures

__all__ = [
    "AuditSettings", "FaceDescriptor", "FaceDescriber", "Signatures", "SignatureCache", "CohortAudit",
    "perceptual_hash", "hamming_pairs", "duplicate_pairs", "descriptor_pairs", "photo_signatures",
    "audit_manifest", "merged_groups", "evaluate_same_person", "evaluate_duplicates", "SamePersonEvaluation",
    "PAIR_KINDS", "audit_settings", "color_thumbnail", "color_distance",
]
