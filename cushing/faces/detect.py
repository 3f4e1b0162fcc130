"""Detection, alignment and the finished crop: dlib's detector (HOG, upsampled for small faces, or the mmod CNN) and
68 landmarks, the eyes levelled about their midpoint and a crop that keeps forehead and chin, in one warp, at
WORK x WORK; then the mask (the landmark hull, or the prompt SAM is given), a white background, the white border
trimmed, a padded square resized to the output size, and the record of how. dlib is imported where its models are
made."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cushing.data.weights import landmark_model_path, models_dir
from cushing.faces.sam import SamPrompt
from cushing.faces.settings import FaceSettings

__all__ = ["WORK", "Detection", "detect", "hull_mask", "sam_prompt", "finish", "FaceResult"]

WORK = 448  # working resolution of the aligned crop (2x the output): SAM and the hull run here


@dataclass
class Detection:
    image: np.ndarray  # aligned crop at WORK x WORK
    landmarks: np.ndarray  # [68, 2] in crop pixels
    face_box: np.ndarray  # [4] in crop pixels
    upsample: int
    faces: int
    multiple: bool
    angle: float


class _Dlib:
    """dlib models, loaded once per process on first use."""

    def __init__(self, s: FaceSettings):
        import dlib

        self.detector = (dlib.cnn_face_detection_model_v1(str(models_dir() / "mmod_human_face_detector.dat"))
                         if s.detector == "cnn" else dlib.get_frontal_face_detector())
        self.predictor = dlib.shape_predictor(str(landmark_model_path()))
        self.cnn = s.detector == "cnn"

    def faces(self, img: np.ndarray, max_up: int) -> tuple[list, int]:
        for up in range(max_up + 1):
            found = self.detector(img, up)
            rects = [d.rect for d in found] if self.cnn else list(found)
            if rects:
                return rects, up
        return [], max_up

    def landmarks(self, img: np.ndarray, rect) -> np.ndarray:
        return np.array([[p.x, p.y] for p in self.predictor(img, rect).parts()], dtype=np.float64)


def _align(img: np.ndarray, pts: np.ndarray, s: FaceSettings) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """Rotate about the eyes' midpoint so they are level, crop a margin around forehead-to-chin, in one warp."""
    import cv2

    left, right = pts[36:42].mean(0), pts[42:48].mean(0)
    angle = math.degrees(math.atan2(right[1] - left[1], right[0] - left[0]))
    mid = (left + right) / 2
    rot = cv2.getRotationMatrix2D((float(mid[0]), float(mid[1])), angle, 1.0)
    p = np.c_[pts, np.ones(68)] @ rot.T
    brow_top = p[17:27, 1].min()
    top = brow_top - s.forehead * max(1.0, p[30, 1] - brow_top)
    x0, x1, bottom = p[0:17, 0].min(), p[0:17, 0].max(), p[0:17, 1].max()
    cx, cy = (x0 + x1) / 2, (top + bottom) / 2
    scale = WORK / (max(x1 - x0, bottom - top) * (1 + 2 * s.margin))
    m = np.array([[scale, 0, WORK / 2 - scale * cx], [0, scale, WORK / 2 - scale * cy]]) @ np.vstack([rot, [0, 0, 1]])
    crop = cv2.warpAffine(img, m, (WORK, WORK), flags=cv2.INTER_LINEAR, borderValue=(255, 255, 255))
    lm = np.c_[pts, np.ones(68)] @ m.T
    box_top = WORK / 2 - scale * (cy - top)
    box = np.array([scale * (x0 - cx) + WORK / 2, box_top, scale * (x1 - cx) + WORK / 2, lm[0:17, 1].max()])
    return crop, lm, box, angle


def detect(img: np.ndarray, models: _Dlib, s: FaceSettings) -> Detection | str:
    """The aligned crop of the largest face, or a reason code."""
    rects, up = models.faces(img, s.max_upsample)
    if not rects:
        return "no_face"
    areas = sorted((r.width() * r.height(), i) for i, r in enumerate(rects))[::-1]
    if len(areas) > 1 and areas[1][0] >= s.multi_face_ratio * areas[0][0]:
        return "multiple_faces"
    crop, lm, box, angle = _align(img, models.landmarks(img, rects[areas[0][1]]), s)
    return Detection(crop, lm, box, up, len(rects), len(rects) > 1, angle)


def hull_mask(d: Detection, s: FaceSettings) -> np.ndarray:
    """Jaw line plus the brows lifted by the forehead height: the face without SAM."""
    import cv2

    lm = d.landmarks
    lift = s.forehead * max(1.0, lm[30, 1] - lm[17:27, 1].min())
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

    img, lm = d.image.copy(), d.landmarks.copy()
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


def _unprompted(d: Detection, s: FaceSettings) -> FaceResult:
    """The finished crop without SAM: the landmark hull's mask, or (mask=none) none."""
    return _result(d, hull_mask(d, s) if s.mask_method == "landmark_hull" else None, float("nan"), s)
