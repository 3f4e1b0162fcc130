"""What the face stage is told (`FaceSettings`: detector, margins, mask, output size), the reason codes a photo can
be rejected with, and the settings sidecar a face-crop manifest is written with. Light: no dlib, no torch."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cushing.data.imageio import DEFAULT_MAX_PIXELS
from cushing.data.imageio import REASONS as IMAGE_REASONS

__all__ = ["FaceSettings", "REASONS", "SETTINGS_FILE", "settings_for_manifest"]


SETTINGS_FILE = "faces_settings.json"
REASONS = {  # the decoder's codes (imageio.REASONS) plus the face stage's own
    **IMAGE_REASONS,
    "no_face": "no face found (HOG detector, upsampled up to max_upsample)",
    "multiple_faces": "two or more faces of similar size: which one is the patient is ambiguous",
    "empty_mask": "the mask covered nothing",
    "duplicate_of": "the same pixels as an earlier photo of the manifest (detail: its line)",
}


@dataclass(frozen=True)
class FaceSettings:
    detector: str = "hog"  # hog | cnn (dlib's mmod CNN detector)
    max_upsample: int = 2  # escalate 0..max_upsample for small faces
    margin: float = 0.15  # extra space around forehead-to-chin and ear-to-ear, per side
    forehead: float = 0.8  # forehead height above the brows, in brow-to-nose-tip distances
    out_size: int = 224
    mask: str = "auto"  # auto (SAM when a checkpoint is given, else landmark hull) | sam | landmark_hull | none
    sam_checkpoint: str | None = None
    sam_model_type: str | None = None  # vit_h | vit_l | vit_b; inferred from the weights when not given
    multi_face_ratio: float = 0.5  # a second face at least this fraction of the largest's area: ambiguous
    max_pixels: int = DEFAULT_MAX_PIXELS
    device: str = "auto"

    def __post_init__(self) -> None:
        if self.detector not in ("hog", "cnn"):
            raise ValueError(f"detector must be hog or cnn, got {self.detector!r}")
        if self.mask not in ("auto", "sam", "landmark_hull", "none"):
            raise ValueError(f"mask must be auto, sam, landmark_hull or none, got {self.mask!r}")
        if self.mask == "sam" and not self.sam_checkpoint:
            raise ValueError("mask=sam needs --sam-checkpoint (a vit_h, vit_l or vit_b SAM file)")
        if self.sam_checkpoint and not Path(self.sam_checkpoint).is_file():
            raise FileNotFoundError(f"SAM checkpoint not found: {self.sam_checkpoint}")

    @property
    def mask_method(self) -> str:
        return ("sam" if self.sam_checkpoint else "landmark_hull") if self.mask == "auto" else self.mask

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @staticmethod
    def from_dict(d: dict[str, Any]) -> "FaceSettings":
        names = {f.name for f in dataclasses.fields(FaceSettings)}
        return FaceSettings(**{k: v for k, v in d.items() if k in names})


def settings_for_manifest(manifest: str | Path) -> dict[str, Any] | None:
    """The face-stage settings a face-crop manifest was produced with (its sidecar), else None."""
    side = Path(manifest).parent / SETTINGS_FILE
    return json.loads(side.read_text()) if side.exists() else None
