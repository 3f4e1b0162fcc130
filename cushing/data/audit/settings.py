"""The audit's thresholds and detector knobs (`AuditSettings`), measured on CelebA, and the vocabulary of its
outputs (pair kinds, decisions and outcomes, with the words every report uses for them)."""
from __future__ import annotations

from dataclasses import dataclass

from cushing.config import parse_audit_threshold
from cushing.data.manifest import Manifest

__all__ = ["AuditSettings", "audit_settings", "parse_audit_threshold", "PAIR_KINDS",
           "DECISIONS", "VERDICTS", "OUTCOMES", "TOGETHER"]

PAIR_KINDS = ("duplicate_photo", "same_person")
# what the audit decided for a pair, and what it says of it: words that claim no more than it knows
DECISIONS = {
    "merged": "merged: one photo or one person (a duplicate photo, or closer than the strict distance)",
    "precaution": "kept in one split as a precaution, for review",
    "review": "for review, not kept together (below the threshold, not mutual nearest neighbours)",
    "below_threshold": "a near miss, not kept together",
}
VERDICTS = ("same", "different")  # what a person wrote in the decisions file
# a pair's outcome: its decision, unless a person's verdict merged (same) or released (different) it
OUTCOMES = {**DECISIONS, "merged": "merged: one photo or one person (certain, or marked same)",
            "released": "released: marked different, not kept together"}
TOGETHER = ("merged", "precaution")  # outcomes whose subject ids share one split group


@dataclass(frozen=True)
class AuditSettings:
    """Thresholds and detector knobs; the defaults were measured on CelebA (`python -m cushing.audit --evaluate`)."""

    hash_image: int = 64  # grayscale side before the DCT: 64 keeps the 16x16 block well below the resize blur
    hash_block: int = 16  # DCT block side: 16x16 = 256 bits
    # of 256 bits: re-saved copies (PNG, JPEG q60, 0.5-3x resizes, mirrored) drifted <= 26 bits; the closest two
    # photos of different CelebA identities, over all 28.1M pairs of the 7,499, were 48 bits apart
    duplicate_max_bits: int = 40
    # a pHash match is confirmed by colour: mean |difference| of 8x8 RGB thumbnails (0-255). Re-saved CelebA copies
    # differ by <= 4.6 (0.5x at JPEG q40, the harshest), different photos by >= 15; two different drawings of the
    # synthetic demo cohort that pHash cannot tell apart (same layout) differ by >= 5.2
    duplicate_max_color: float = 5.0
    mirror: bool = True  # also match horizontally flipped copies (selfie cameras, flip augmentation)
    faces: bool = True  # compute face descriptors (dlib); False audits duplicates only
    # Euclidean; None = automatic (module `threshold`). At 343 photos (85% women) that is 0.525: 75% of same-person
    # pairs found on held-out CelebA, vs 43% at the old fixed 0.45.
    same_person_max_distance: float | None = None
    false_pairs_per_photo: float = 0.2  # the bound b of the automatic threshold (docs: cohort audit)
    certain_false_pairs: float = 0.05  # E at the strict distance (merged as one person): ~1 cohort in 20 errs once
    mutual_k: int = 2  # a pair below the threshold merges only if each is among the other's k nearest strangers
    max_group_share: float = 0.05  # the guard: merged groups hold at most max(floor(share x photos), 3) photos
    near_misses: int = 20  # the closest pairs at or above the threshold, listed as below_threshold
    curve: str | None = None  # a same-person curve CSV (`cushing audit --evaluate`); None = the shipped one
    decisions: str | None = None  # a reviewed CSV: pairs marked same or different by a person
    max_upsample: int = 2  # HOG pyramid up-steps tried in order until a face is found (tiny photos need 1)
    cnn_fallback: bool = True  # mmod CNN detector when HOG finds nothing (slow: ~0.4 s per such photo)
    max_side: int = 800  # larger photos are downscaled first: the descriptor chip is 150 px anyway
    flip_average: bool = True  # average the descriptors of the photo and its mirror image (both are cached)

    def __post_init__(self) -> None:
        if self.hash_block * self.hash_block % 64 or self.hash_block > self.hash_image:
            raise ValueError(f"hash_block must make whole 64-bit words and fit hash_image, got {self.hash_block}")
        if not 0 <= self.duplicate_max_bits <= self.hash_block ** 2:
            raise ValueError(f"duplicate_max_bits must be in 0..{self.hash_block ** 2}")
        if self.same_person_max_distance is not None and not self.same_person_max_distance > 0:
            raise ValueError("same_person_max_distance must be > 0 (or None: automatic)")
        if not (self.false_pairs_per_photo > 0 and self.certain_false_pairs >= 0 and self.mutual_k >= 1
                and 0 < self.max_group_share <= 1):
            raise ValueError("false_pairs_per_photo > 0, certain_false_pairs >= 0, mutual_k >= 1 and "
                             "0 < max_group_share <= 1")


def audit_settings(manifest: Manifest, threshold: str | float | None = None, decisions: str | None = None,
                   curve: str | None = None, faces: bool = True) -> AuditSettings:
    """The defaults, without the same-person check on a synthetic cohort (or with `faces` false): dlib sees every
    drawn demo face as one person. `threshold` is `auto` (None) or a distance; `decisions` a reviewed decisions
    file; `curve` a site's same-person curve (default the shipped one)."""
    return AuditSettings(faces=faces and not manifest.synthetic, decisions=decisions or None, curve=curve or None,
                         same_person_max_distance=parse_audit_threshold(threshold))
