"""The audit's thresholds and detector knobs (`AuditSettings`), measured on CelebA, and the vocabulary of its
outputs (descriptor sources, pair kinds)."""
from __future__ import annotations

from dataclasses import dataclass

from cushing.data.manifest import Manifest

__all__ = ["AuditSettings", "audit_settings", "DESCRIPTOR_SOURCES", "PAIR_KINDS"]

DESCRIPTOR_SOURCES = ("detected", "whole_image")
PAIR_KINDS = ("duplicate_photo", "same_person")


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
    # Euclidean. dlib's documented 0.6 (LFW) matches 0.84% of stranger pairs on 89x109 CelebA photos (~500 false
    # pairs in a 343-photo cohort, one merged blob); 0.45 keeps it to ~4-7 while finding 43% of true pairs.
    same_person_max_distance: float = 0.45
    max_upsample: int = 2  # HOG pyramid up-steps tried in order until a face is found (tiny photos need 1)
    cnn_fallback: bool = True  # mmod CNN detector when HOG finds nothing (slow: ~0.4 s per such photo)
    max_side: int = 800  # larger photos are downscaled first: the descriptor chip is 150 px anyway
    flip_average: bool = True  # average the descriptors of the photo and its mirror image (both are cached)

    def __post_init__(self) -> None:
        if self.hash_block * self.hash_block % 64 or self.hash_block > self.hash_image:
            raise ValueError(f"hash_block must make whole 64-bit words and fit hash_image, got {self.hash_block}")
        if not 0 <= self.duplicate_max_bits <= self.hash_block ** 2:
            raise ValueError(f"duplicate_max_bits must be in 0..{self.hash_block ** 2}")
        if not self.same_person_max_distance > 0:
            raise ValueError("same_person_max_distance must be > 0")


def audit_settings(manifest: Manifest) -> AuditSettings:
    """The defaults, without the same-person check on a synthetic cohort: dlib's face-recognition model was
    trained on photos and sees every drawn demo face as one person, so its distances mean nothing there."""
    return AuditSettings(faces=not manifest.synthetic)
