"""Detection and alignment: dlib's detector (HOG, upsampled for small faces, or the mmod CNN) and 68 landmarks, the
eyes levelled about their midpoint and a crop that keeps forehead and chin, in one warp, at WORK x WORK. dlib is
imported where its models are made."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from cushing.data.weights import landmark_model_path, models_dir
from cushing.faces.settings import FaceSettings

__all__ = ["WORK", "Detection", "detect"]

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
        shape = self.predictor(img, rect)
        return np.array([[p.x, p.y] for p in shape.parts()], dtype=np.float64)


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
    side = max(x1 - x0, bottom - top) * (1 + 2 * s.margin)
    scale = WORK / side
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
    rect = rects[areas[0][1]]
    crop, lm, box, angle = _align(img, models.landmarks(img, rect), s)
    return Detection(crop, lm, box, up, len(rects), len(rects) > 1, angle)
