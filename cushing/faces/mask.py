"""Masking and the finished crop: the landmark hull (jaw line and lifted brows) or the prompt SAM is given, then a
white background, the white border trimmed, a padded square resized to the output size, and the record of how."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cushing.faces.detect import WORK, Detection
from cushing.faces.sam import SamPrompt
from cushing.faces.settings import FaceSettings

__all__ = ["hull_mask", "sam_prompt", "finish", "FaceResult"]


def hull_mask(d: Detection, s: FaceSettings) -> np.ndarray:
    """Jaw line plus the brows lifted by the forehead height: the face without SAM."""
    import cv2

    lm = d.landmarks
    brow_top = lm[17:27, 1].min()
    lift = s.forehead * max(1.0, lm[30, 1] - brow_top)
    poly = np.vstack([lm[0:17], lm[17:27][::-1] - [0, lift]])
    mask = np.zeros((WORK, WORK), np.uint8)
    cv2.fillPoly(mask, [cv2.convexHull(np.round(poly).astype(np.int32))], 1)
    return mask.astype(bool)


def sam_prompt(d: Detection):
    lm = d.landmarks
    centre = lm[27:36].mean(0)  # the face centre: the nose
    cheeks = [(lm[3] + lm[31]) / 2, (lm[13] + lm[35]) / 2]
    forehead = [(lm[19] + lm[24]) / 2 - [0, 0.5 * (lm[30, 1] - lm[27, 1])]]
    chin = [lm[8] + (lm[57] - lm[8]) * 0.4]
    return SamPrompt(points=np.vstack([centre, lm[30], *cheeks, *forehead, *chin]), box=d.face_box)


def finish(d: Detection, mask: np.ndarray | None, s: FaceSettings) -> tuple[np.ndarray, np.ndarray, float]:
    """White background, white border trimmed, padded square, resized to out_size. (crop, landmarks, area)."""
    import cv2

    img = d.image.copy()
    lm = d.landmarks.copy()
    if mask is None:
        mask = np.ones(img.shape[:2], bool)
    area = float(mask.mean())
    img[~mask] = 255
    ys, xs = np.nonzero(mask)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    img, lm = img[y0:y1, x0:x1], lm - [x0, y0]
    h, w = img.shape[:2]
    side = max(h, w)
    canvas = np.full((side, side, 3), 255, np.uint8)
    oy, ox = (side - h) // 2, (side - w) // 2
    canvas[oy:oy + h, ox:ox + w] = img
    lm = (lm + [ox, oy]) * (s.out_size / side)
    out = cv2.resize(canvas, (s.out_size, s.out_size), interpolation=cv2.INTER_AREA if side > s.out_size
                     else cv2.INTER_CUBIC)
    return out, lm, area


@dataclass
class FaceResult:
    status: str  # ok | a reason code
    crop: np.ndarray | None = None
    record: dict[str, Any] = field(default_factory=dict)


def _result(d: Detection, mask: np.ndarray | None, score: float, s: FaceSettings) -> FaceResult:
    if mask is not None and not mask.any():
        return FaceResult("empty_mask")
    crop, lm, area = finish(d, mask, s)
    return FaceResult("ok", crop, {
        "face_detector": s.detector, "face_upsample": d.upsample, "face_count": d.faces,
        "face_multiple": int(d.multiple), "face_angle_deg": round(d.angle, 3), "face_mask_source": s.mask_method,
        "face_mask_area": round(area, 5), "face_mask_score": score,
        "face_landmarks": json.dumps(np.round(lm, 2).tolist())})
