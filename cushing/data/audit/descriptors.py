"""The same person: dlib's 128-d ResNet face descriptor (HOG detection with upsampling, the mmod CNN when HOG finds
nothing, the whole image as a last resort; 68-point alignment; photo and mirror averaged) and the pairs of
descriptors closer than a threshold. dlib is imported where a describer is made."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from cushing.data.audit.settings import AuditSettings
from cushing.data.weights import file_hash, models_dir

__all__ = ["FaceDescriptor", "FaceDescriber", "descriptor_pairs", "LANDMARKS", "DESCRIPTOR_MODEL", "CURVE_MODELS"]

LANDMARKS = "shape_predictor_68_face_landmarks.dat"  # the chip's alignment (the 5-point model until issue 22)
DESCRIPTOR_MODEL = "dlib_face_recognition_resnet_model_v1.dat"
CNN_MODEL = "mmod_human_face_detector.dat"
# a curve's header key -> the model file whose sha256 it records (a curve measured with other weights does not apply)
CURVE_MODELS = {"sha256_descriptor_model": DESCRIPTOR_MODEL, "sha256_landmark_model": LANDMARKS}


def _import_dlib():
    try:
        import dlib
    except ImportError:
        raise ImportError("the same-person audit needs dlib: pip install dlib-bin==20.0.1.post1 "
                          "face-recognition-models==0.3.0 (or audit duplicates only with faces=False)") from None
    return dlib


@dataclass(frozen=True)
class FaceDescriptor:
    vector: np.ndarray  # [128] float32, from the photo
    mirrored: np.ndarray  # [128] float32, from the photo flipped left-right (same face box, mirrored)
    source: str  # detected | whole_image
    detector: str  # hog | cnn | "" (whole image)
    upsample: int


class FaceDescriber:
    """dlib's HOG detector, 68-point landmarks and ResNet descriptor (+ the mmod CNN on demand). The 68-point model
    aligns the 150 px chip better than the 5-point one: +0.016 recall at the same false-pair rate on CelebA, most
    for women, at the same cost. Native dlib objects are not thread-safe: one per process, never shared."""

    def __init__(self, settings: AuditSettings = AuditSettings()):
        dlib = _import_dlib()
        models = models_dir()
        need = [models / LANDMARKS, models / DESCRIPTOR_MODEL]
        if missing := [p.name for p in need if not p.exists()]:
            raise ImportError(f"{', '.join(missing)} not found in {models}: reinstall face-recognition-models==0.3.0")
        self.settings, self._dlib, self._cnn = settings, dlib, None
        self.hog = dlib.get_frontal_face_detector()
        self.landmarks = dlib.shape_predictor(str(need[0]))
        self.net = dlib.face_recognition_model_v1(str(need[1]))

    def _cnn_detector(self):
        if self._cnn is None:
            self._cnn = self._dlib.cnn_face_detection_model_v1(str(models_dir() / CNN_MODEL))
        return self._cnn

    def _find(self, img: np.ndarray) -> tuple[Any, str, int]:
        """Largest face: HOG up the pyramid (bounded so big photos stay cheap), then the CNN, else none."""
        side = max(img.shape[:2])
        for up in range(self.settings.max_upsample + 1):
            if up and side * 2 ** up > 2 * self.settings.max_side:
                break
            if rects := list(self.hog(img, up)):
                return max(rects, key=lambda r: r.area()), "hog", up
        if self.settings.cnn_fallback:
            for up in (0, 1):
                if up and side * 2 > self.settings.max_side:
                    break
                if rects := [d.rect for d in self._cnn_detector()(img, up)]:
                    return max(rects, key=lambda r: r.area()), "cnn", up
        return None, "", -1

    def _vector(self, img: np.ndarray, rect) -> np.ndarray:
        shape = self.landmarks(img, rect)
        return np.asarray(self.net.compute_face_descriptor(img, shape), dtype=np.float32)

    def describe(self, rgb: np.ndarray) -> FaceDescriptor:
        """The mirrored descriptor is kept too: averaging the two recovered more same-person pairs at the same
        false-match rate on 89x109 CelebA photos (test-time flip, as in face verification practice)."""
        img = np.ascontiguousarray(rgb)
        h, w = img.shape[:2]
        rect, detector, up = self._find(img)
        source = "detected"
        if rect is None:  # an already aligned crop: let the whole image stand for the face
            rect, source = self._dlib.rectangle(0, 0, w - 1, h - 1), "whole_image"
        flipped = np.ascontiguousarray(img[:, ::-1])
        mrect = self._dlib.rectangle(w - 1 - rect.right(), rect.top(), w - 1 - rect.left(), rect.bottom())
        return FaceDescriptor(self._vector(img, rect), self._vector(flipped, mrect), source, detector, up)


def descriptor_pairs(descriptors: np.ndarray, max_distance: float, *, groups: Sequence | None = None,
                     block_rows: int = 1024) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(i, j, distance), i < j, Euclidean distance < max_distance; with `groups`, only pairs whose groups differ.
    Rows with NaN are skipped. One matrix product per block screens, the survivors are recomputed exactly, so
    results do not depend on the block size."""
    full = np.asarray(descriptors, dtype=np.float64)
    idx = np.flatnonzero(np.isfinite(full).all(axis=1))
    full = full[idx]
    x = full.astype(np.float32)  # screening in float32 (with a margin), exact distances in float64 after
    codes = pd.factorize(np.asarray(groups, dtype=object)[idx])[0] if groups is not None else None
    sq = (x * x).sum(axis=1)
    limit = np.float32((max_distance + 1e-3) ** 2)
    found: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    for s in range(0, len(x), block_rows):
        d2 = sq[s:s + block_rows, None] + sq[None, s:] - 2.0 * (x[s:s + block_rows] @ x[s:].T)
        ii, jj = np.nonzero(d2 < limit)
        ii, jj = ii + s, jj + s  # only the upper triangle was computed
        keep = jj > ii
        if codes is not None:
            keep &= codes[ii] != codes[jj]
        ii, jj = ii[keep], jj[keep]
        for c in range(0, len(ii), 100_000):  # bounded memory even when a loose threshold keeps most pairs
            a, b = ii[c:c + 100_000], jj[c:c + 100_000]
            d = np.linalg.norm(full[a] - full[b], axis=1)
            ok = d < max_distance
            found.append((idx[a[ok]], idx[b[ok]], d[ok]))
    if not found:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0)
    return tuple(np.concatenate(v) for v in zip(*found))  # type: ignore[return-value]


def _dlib_version() -> str:
    from importlib import metadata

    for dist in ("dlib-bin", "dlib"):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return _import_dlib().__version__


def _face_fingerprint(s: AuditSettings, memo: Path) -> dict[str, Any]:
    """What a descriptor depends on besides the photo: the weights (hashed, memoised), dlib, the knobs."""
    names = [LANDMARKS, DESCRIPTOR_MODEL, *([CNN_MODEL] if s.cnn_fallback else [])]
    return {"dlib": _dlib_version(), "weights": {n: file_hash(models_dir() / n, memo) for n in names},
            "max_upsample": s.max_upsample, "cnn_fallback": s.cnn_fallback, "max_side": s.max_side}
