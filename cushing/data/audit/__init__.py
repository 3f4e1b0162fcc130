"""Cohort audit: the same photo twice, and the same person under two subject ids.

Either one defeats the subject-grouped split: a re-saved copy of a training photo in the test set, or a patient
photographed at two visits and entered under two ids, is leakage that the manifest's byte-level duplicate check
cannot see. This package finds both and returns values only (no MLflow, no files beyond its content-addressed cache):

- **Duplicate photos**: a 256-bit DCT perceptual hash (64x64 grayscale after EXIF orientation, the lowest 16x16 DCT
  coefficients against their median), compared by Hamming distance, also against each photo's mirror image.
  The classic 64-bit pHash is not enough here: aligned faces share their low frequencies, and on CelebA distinct
  people came within 4 bits while a re-encoded copy drifted by 6 (see `evaluate_duplicates`).
- **Same person**: dlib's 128-d ResNet face descriptor (HOG detection with upsampling, the mmod CNN detector when
  HOG finds nothing, the whole image as the face box as a last resort, recorded as `whole_image`; 68-point
  alignment; photo and mirror averaged), pairs of different subject ids closer than a threshold chosen for the
  cohort (`threshold`: the shipped false-pair curve x this cohort's pairs by sex, mutual nearest neighbours, a
  guard on group size) or given. Each pair gets a decision in words that claim no more than the audit knows:
  `merged` (one photo, or closer than a strict distance where the curve expects no false pair in the cohort),
  `precaution` (kept in one split, for review), `review`, `below_threshold`; a person's decisions file turns a
  pair into a merge (`same`) or releases it (`different`).
- `merged_groups` turns the pairs into group ids so a splitter keeps merged and precaution subjects in one split.

Hashes and descriptors are cached per photo content (sha256 of the bytes) in small JSON files written atomically,
so a rerun over the same cohort decodes nothing. Outputs carry CSV line numbers and keyed subject hashes, never
paths or raw ids.

Owns: `settings` (thresholds and knobs), `hashing` (perceptual hash, colour thumbnails, Hamming pairs),
`descriptors` (dlib face descriptors and their pairs), `signatures` (per photo, on a process pool, cached by
content), `threshold` (the automatic threshold: curve, pair counts, mutual neighbours, guard), `sameperson` (pairs
and their decisions), `decisions` (a person's reviewed verdicts), `pairing` (pairs of different subject ids, merged
groups), `report` (`audit_manifest`, `CohortAudit`), `review` (the local HTML review page), `evaluation` and
`curvefile` (the thresholds and the same-person curve measured on real identities, `same_person_curve.csv`).
May import `cushing.data.manifest`, `cushing.data.imageio`, `cushing.data.weights`, `cushing.stats` and
`cushing.config`; neither torch nor mlflow; dlib only where a describer is made.
"""
from __future__ import annotations

from cushing.data.audit.descriptors import FaceDescriber, FaceDescriptor, descriptor_pairs
from cushing.data.audit.evaluation import SamePersonEvaluation, evaluate_duplicates, evaluate_same_person
from cushing.data.audit.hashing import color_distance, color_thumbnail, duplicate_pairs, hamming_pairs, \
    perceptual_hash
from cushing.data.audit.pairing import merged_groups
from cushing.data.audit.report import CohortAudit, audit_manifest
from cushing.data.audit.settings import DESCRIPTOR_SOURCES, PAIR_KINDS, AuditSettings, audit_settings
from cushing.data.audit.signatures import SignatureCache, Signatures, photo_signatures

__all__ = [
    "AuditSettings", "FaceDescriptor", "FaceDescriber", "Signatures", "SignatureCache", "CohortAudit",
    "perceptual_hash", "hamming_pairs", "duplicate_pairs", "descriptor_pairs", "photo_signatures",
    "audit_manifest", "merged_groups", "evaluate_same_person", "evaluate_duplicates", "SamePersonEvaluation",
    "DESCRIPTOR_SOURCES", "PAIR_KINDS", "audit_settings", "color_thumbnail", "color_distance",
]
