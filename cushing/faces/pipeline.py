"""Face extraction as in the paper: dlib detection and 68 landmarks, eyes levelled, a crop that keeps forehead and
chin, a Segment Anything mask (or the landmark hull, recorded as such), white background, white border trimmed,
224 px. Cached by content; bad photos get a reason code and the others go on.

Writes only to the output and cache folders it is given. dlib and segment_anything are imported lazily, and a
run over cached photos loads no model at all.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import queue
import secrets
import threading
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import pandas as pd

from cushing.data.weights import file_hash, landmark_model_path, models_dir
from cushing.data.imageio import DEFAULT_MAX_PIXELS, BadImage, open_rgb
from cushing.data.imageio import REASONS as IMAGE_REASONS
from cushing.data.manifest import load_manifest, REQUIRED, sha256_file, subject_key
from cushing.faces.sam import SamMasker, SamPrompt
from cushing.config import cache_home

__all__ = ["FaceSettings", "FaceResult", "FaceExtractor", "extract_faces", "FacesOutcome",
           "settings_for_manifest", "SETTINGS_FILE", "REASONS"]

SETTINGS_FILE = "faces_settings.json"
REASONS = {  # the decoder's codes (imageio.REASONS) plus the face stage's own
    **IMAGE_REASONS,
    "file_not_found": "the photo file does not exist",
    "no_face": "no face found (HOG detector, upsampled up to max_upsample)",
    "multiple_faces": "two or more faces of similar size: which one is the patient is ambiguous",
    "empty_mask": "the mask covered nothing",
    "duplicate_of": "the same pixels as an earlier photo of the manifest (detail: its line)",
}
WORK = 448  # working resolution of the aligned crop (2x the output): SAM and the hull run here


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
        if self.mask == "auto":
            return "sam" if self.sam_checkpoint else "landmark_hull"
        return self.mask

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @staticmethod
    def from_dict(d: dict[str, Any]) -> "FaceSettings":
        names = {f.name for f in dataclasses.fields(FaceSettings)}
        return FaceSettings(**{k: v for k, v in d.items() if k in names})


def weights_fingerprint(s: FaceSettings, memo: Path | None = None) -> dict[str, str]:
    import dlib

    fp = {"dlib": dlib.__version__, "landmarks": file_hash(landmark_model_path(), memo)}
    if s.detector == "cnn":
        fp["detector"] = file_hash(models_dir() / "mmod_human_face_detector.dat", memo)
    if s.mask_method == "sam":
        fp["sam"] = file_hash(Path(s.sam_checkpoint), memo)
    return fp


def cache_key(photo_sha: str, s: FaceSettings, fingerprint: dict[str, str]) -> str:
    params = {k: v for k, v in s.to_dict().items() if k not in ("sam_checkpoint", "device")}
    blob = json.dumps({"photo": photo_sha, "settings": params, "weights": fingerprint, "v": 1}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


# ------------------------------------------------------------------------------------------------ geometry

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


# ------------------------------------------------------------------------------------------------ one photo

@dataclass
class FaceResult:
    status: str  # ok | a reason code
    crop: np.ndarray | None = None
    record: dict[str, Any] = field(default_factory=dict)


class FaceExtractor:
    """The whole pipeline for single photos (serving), safe to call from many threads at once.

    The scoring server calls `predict` from a pool of threads; dlib's detector and shape predictor crash the process
    when two threads use one object (seen: signal 11 at 4 concurrent clients). Each call borrows one of at most
    `pool` dlib model sets (made on first need, about 100 MB each) and returns it; SAM, which keeps per-image state,
    runs one image at a time behind a lock."""

    def __init__(self, settings: FaceSettings, pool: int | None = None):
        self.s = settings
        self._free: queue.LifoQueue = queue.LifoQueue()
        self._made = 0
        self._limit = max(1, pool or min(4, os.cpu_count() or 1))
        self._lock = threading.Lock()
        self._sam = None
        self._sam_lock = threading.Lock()

    def _borrow(self) -> _Dlib:
        """A free model set, else a new one while under the limit, else wait for one. A set that fails to build
        frees its slot (the error goes to this caller), so waiting callers retry instead of waiting forever."""
        while True:
            try:
                return self._free.get_nowait()
            except queue.Empty:
                pass
            with self._lock:
                make = self._made < self._limit
                self._made += make
            if make:
                try:
                    return _Dlib(self.s)
                except BaseException:
                    with self._lock:
                        self._made -= 1
                    raise
            try:
                return self._free.get(timeout=1.0)
            except queue.Empty:
                continue

    @contextmanager
    def _models(self) -> Iterator[_Dlib]:
        models = self._borrow()
        try:
            yield models
        finally:
            self._free.put(models)

    def _masker(self):
        if self._sam is None:
            self._sam = SamMasker(self.s.sam_checkpoint, self.s.sam_model_type, self.s.device)
        return self._sam

    def extract(self, rgb: np.ndarray) -> FaceResult:
        with self._models() as models:
            d = detect(rgb, models, self.s)
        if isinstance(d, str):
            return FaceResult(d)
        mask, score = self._mask(d)
        return _result(d, mask, score, self.s)

    def _mask(self, d: Detection) -> tuple[np.ndarray | None, float]:
        method = self.s.mask_method
        if method == "sam":
            with self._sam_lock:
                return self._masker().masks([d.image], [sam_prompt(d)])[0]
        if method == "landmark_hull":
            return hull_mask(d, self.s), float("nan")
        return None, float("nan")


def _result(d: Detection, mask: np.ndarray | None, score: float, s: FaceSettings) -> FaceResult:
    if mask is not None and not mask.any():
        return FaceResult("empty_mask")
    crop, lm, area = finish(d, mask, s)
    return FaceResult("ok", crop, {
        "face_detector": s.detector, "face_upsample": d.upsample, "face_count": d.faces,
        "face_multiple": int(d.multiple), "face_angle_deg": round(d.angle, 3), "face_mask_source": s.mask_method,
        "face_mask_area": round(area, 5), "face_mask_score": score,
        "face_landmarks": json.dumps(np.round(lm, 2).tolist())})


# ------------------------------------------------------------------------------------------------ many photos

_WORKER: dict[str, Any] = {}


def _init_worker(settings: dict[str, Any]) -> None:
    s = FaceSettings.from_dict(settings)
    _WORKER["s"], _WORKER["dlib"] = s, _Dlib(s)


def _detect_one(item: tuple[int, str]) -> tuple[int, Any]:
    """Worker: decode, detect, align (and finish with the hull when SAM is not used)."""
    i, path = item
    s: FaceSettings = _WORKER["s"]
    try:
        rgb = open_rgb(path, max_pixels=s.max_pixels, draft=1600)
    except BadImage as e:
        return i, (e.reason, e.detail)
    d = detect(rgb, _WORKER["dlib"], s)
    if isinstance(d, str):
        return i, (d, "")
    if s.mask_method == "sam":
        return i, d
    mask = hull_mask(d, s) if s.mask_method == "landmark_hull" else None
    r = _result(d, mask, float("nan"), s)
    return i, r


@dataclass
class FacesOutcome:
    manifest: Path  # the face-crop manifest (same contract + face_* columns)
    report: pd.DataFrame  # one row per input photo: status, reason
    settings: FaceSettings
    cached: int
    processed: int
    seconds: float
    subject_key: str = ""  # key of the hashed subject ids in what is logged (from the photos' bytes, never logged)

    @property
    def extracted(self) -> int:
        return int((self.report["status"] == "ok").sum())


class _Cache:
    def __init__(self, root: Path):
        self.root = root

    def _paths(self, key: str) -> tuple[Path, Path]:
        d = self.root / key[:2]
        return d / f"{key}.png", d / f"{key}.json"

    def get(self, key: str) -> dict | None:
        png, meta = self._paths(key)
        if not meta.exists():
            return None
        rec = json.loads(meta.read_text())
        if rec["status"] == "ok" and not png.exists():
            return None
        return rec

    def crop_path(self, key: str) -> Path:
        return self._paths(key)[0]

    def put(self, key: str, result: FaceResult | tuple[str, str]) -> dict:
        from PIL import Image

        png, meta = self._paths(key)
        png.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(result, FaceResult) and result.status == "ok":
            Image.fromarray(result.crop).save(png)
            rec = {"status": "ok", **result.record}
        elif isinstance(result, FaceResult):
            rec = {"status": result.status, "detail": ""}
        else:
            rec = {"status": result[0], "detail": result[1]}
        tmp = meta.with_suffix(".tmp")
        tmp.write_text(json.dumps(rec))
        tmp.replace(meta)  # atomic: an interrupted run never leaves half an entry
        return rec


def _read_input(manifest: Path) -> pd.DataFrame:
    return load_manifest(manifest, check_images=False).table


def _hash_photos(paths: Iterable[str]) -> list[str | None]:
    out = []
    for p in paths:
        try:
            out.append(sha256_file(p) if Path(p).is_file() else None)
        except OSError:
            out.append(None)
    return out


def extract_faces(manifest: str | Path, out_dir: str | Path, settings: FaceSettings, *,
                  cache_dir: str | Path | None = None, workers: int = 0, progress: bool = True) -> FacesOutcome:
    """Extract every photo of a manifest into out_dir: crops/, manifest.csv, faces_report.csv, faces_settings.json."""
    import time

    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    out = Path(out_dir)
    (out / "crops").mkdir(parents=True, exist_ok=True)
    table = _read_input(Path(manifest))
    cache = _Cache(Path(cache_dir) if cache_dir else _default_cache())
    shas = _hash_photos(table["path"])
    fp = weights_fingerprint(settings, cache.root / "weights_hashes.json")
    keys = [cache_key(s, settings, fp) if s else None for s in shas]
    records: dict[int, dict] = {}
    todo = []
    for i, (path, key) in enumerate(zip(table["path"], keys)):
        if key is None:
            records[i] = {"status": "file_not_found" if not Path(path).exists() else "unreadable", "detail": ""}
        elif (rec := cache.get(key)) is not None:
            records[i] = rec
        else:
            todo.append(i)
    cached = len(table) - len(todo)
    if todo:
        bar = tqdm(total=len(todo), desc="faces", unit="photo", disable=not progress)
        for i, rec in _process(table, todo, keys, settings, cache, workers, bar):
            records[i] = rec
        bar.close()
    report, crops = _assemble(table, records, keys, shas, cache, out)
    fm = out / "manifest.csv"
    crops.to_csv(fm, index=False)  # with its header even when no photo gave a crop
    report.to_csv(out / "faces_report.csv", index=False)
    (out / SETTINGS_FILE).write_text(json.dumps({**settings.to_dict(), "mask_method": settings.mask_method,
                                                 "weights": fp}, indent=1))
    key = subject_key(shas) if any(shas) else secrets.token_hex(32)  # no readable photo: a key nobody can rebuild
    return FacesOutcome(fm, report, settings, cached, len(todo), time.perf_counter() - t0, key)


def _default_cache() -> Path:
    return cache_home() / "faces"


def _process(table, todo, keys, settings, cache, workers, bar):
    """Misses: dlib on a process pool; SAM (if used) batched in this process on the device."""
    workers = workers or max(1, min(len(todo), os.cpu_count() or 1))
    items = [(i, table["path"].iloc[i]) for i in todo]
    masker = None
    pending: list[tuple[int, Detection]] = []

    def flush():
        nonlocal masker
        if not pending:
            return []
        if masker is None:
            masker = SamMasker(settings.sam_checkpoint, settings.sam_model_type, settings.device)
        res = masker.masks([d.image for _, d in pending], [sam_prompt(d) for _, d in pending])
        done = []
        for (i, d), (mask, score) in zip(pending, res):
            done.append((i, cache.put(keys[i], _result(d, mask, score, settings))))
        pending.clear()
        return done

    if workers == 1:
        _init_worker(settings.to_dict())
        results = map(_detect_one, items)
        pool = None
    else:
        pool = ProcessPoolExecutor(workers, initializer=_init_worker, initargs=(settings.to_dict(),))
        results = pool.map(_detect_one, items, chunksize=4)
    try:
        for i, res in results:
            if isinstance(res, Detection):
                pending.append((i, res))
                if len(pending) >= 16:
                    for done in flush():
                        bar.update(1)
                        yield done
                continue
            bar.update(1)
            yield i, cache.put(keys[i], res)
        for done in flush():
            bar.update(1)
            yield done
    finally:
        if pool:
            pool.shutdown(cancel_futures=True)


def _assemble(table, records, keys, shas, cache, out):
    """The report (every photo) and the face-crop manifest rows (the ones that gave a crop). The same pixels under
    two names (a JPEG and a PNG of one photo) give the same crop: the later one is rejected as `duplicate_of` the
    first, so the crop manifest never holds one face twice."""
    import shutil


    report, rows, first = [], [], {}
    for i in range(len(table)):
        row = table.iloc[i]
        rec = records[i]
        if rec["status"] == "ok":
            pixels = sha256_file(cache.crop_path(keys[i]))
            if pixels in first:
                rec = {"status": "duplicate_of", "detail": f"line {first[pixels]}"}
            first.setdefault(pixels, i + 2)
        ok = rec["status"] == "ok"
        report.append({"line": i + 2, "image": row["image"], "path": row["path"], "subject_id": row["subject_id"],
                       "sex": row["sex"],
                       "label": row["label"], "status": "ok" if ok else "rejected",
                       "reason": "" if ok else rec["status"],
                       "detail": "" if ok else (rec.get("detail") or REASONS.get(rec["status"], ""))})
        if not ok:
            continue
        name = f"crops/{shas[i][:20]}.png"
        target = out / name
        if not target.exists():
            try:
                os.link(cache.crop_path(keys[i]), target)
            except OSError:
                shutil.copyfile(cache.crop_path(keys[i]), target)
        extra = {k: row[k] for k in table.columns if k not in (*REQUIRED, "path", "sha256", "image")}
        rows.append({"image": name, "label": int(row["label"]), "sex": row["sex"], **extra,
                     "source_image": row["path"], **{k: v for k, v in rec.items() if k.startswith("face_")}})
    columns = ["image", "label", "sex", *[k for k in table.columns if k not in (*REQUIRED, "path", "sha256", "image")],
               "source_image"]
    return pd.DataFrame(report), pd.DataFrame(rows, columns=columns if not rows else None)


def settings_for_manifest(manifest: str | Path) -> dict[str, Any] | None:
    """The face-stage settings a face-crop manifest was produced with (its sidecar), else None."""
    side = Path(manifest).parent / SETTINGS_FILE
    return json.loads(side.read_text()) if side.exists() else None
