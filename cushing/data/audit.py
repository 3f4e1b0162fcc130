"""Cohort audit: the same photo twice, and the same person under two subject ids.

Either one defeats the subject-grouped split: a re-saved copy of a training photo in the test set, or a patient
photographed at two visits and entered under two ids, is leakage that the manifest's byte-level duplicate check
cannot see. This module finds both and returns values only (no MLflow, no files beyond its content-addressed cache):

- **Duplicate photos**: a 256-bit DCT perceptual hash (64x64 grayscale after EXIF orientation, the lowest 16x16 DCT
  coefficients against their median), compared by Hamming distance, also against each photo's mirror image.
  The classic 64-bit pHash is not enough here: aligned faces share their low frequencies, and on CelebA distinct
  people came within 4 bits while a re-encoded copy drifted by 6 (see `evaluate_duplicates`).
- **Same person**: dlib's 128-d ResNet face descriptor (HOG detection with upsampling, the mmod CNN detector when
  HOG finds nothing, the whole image as the face box as a last resort, recorded as `whole_image`), pairs of
  different subject ids closer than a Euclidean threshold chosen on real CelebA identities (`evaluate_same_person`).
- `merged_groups` turns the pairs into group ids so a splitter keeps merged subjects in one split.

Hashes and descriptors are cached per photo content (sha256 of the bytes) in small JSON files written atomically,
so a rerun over the same cohort decodes nothing. Outputs carry CSV line numbers and keyed subject hashes, never
paths or raw ids.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import pandas as pd

from cushing.data.imageio import BadImage, open_rgb
from cushing.data.manifest import Manifest, hash_subject, sha256_file, subject_key
from cushing.data.weights import file_hash, models_dir
from cushing.config import cache_home
from cushing.stats.intervals import wilson

__all__ = [
    "AuditSettings", "FaceDescriptor", "FaceDescriber", "Signatures", "SignatureCache", "CohortAudit",
    "perceptual_hash", "hamming_pairs", "duplicate_pairs", "descriptor_pairs", "photo_signatures",
    "audit_manifest", "merged_groups", "evaluate_same_person", "evaluate_duplicates", "SamePersonEvaluation",
    "DESCRIPTOR_SOURCES", "PAIR_KINDS", "audit_settings", "color_thumbnail", "color_distance",
]

HASH_VERSION = 2  # bump when the hash computation changes: old cache entries are then ignored
FACE_VERSION = 1
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


# ------------------------------------------------------------------------------------------ perceptual hash

def perceptual_hash(rgb: np.ndarray, *, size: int = 64, block: int = 16, mirror: bool = False) -> np.ndarray:
    """DCT hash as uint64 words: survives re-encoding, resizing and format change because it keeps only the
    sign of the lowest frequencies relative to their median, which none of those operations move much."""
    from PIL import Image
    from scipy.fft import dctn

    gray = Image.fromarray(np.ascontiguousarray(rgb)).convert("L")
    g = np.asarray(gray.resize((size, size), Image.Resampling.BOX), dtype=np.float64)
    if mirror:
        g = g[:, ::-1]
    coeffs = dctn(g, type=2, norm="ortho")[:block, :block].ravel()
    bits = (coeffs > np.median(coeffs)).astype(np.uint8)
    return np.packbits(bits).view(">u8").astype(np.uint64)


def color_thumbnail(rgb: np.ndarray, side: int = 8) -> np.ndarray:
    """uint8 [side, side, 3] box-filtered thumbnail: what a duplicate's colours must also match."""
    from PIL import Image

    return np.asarray(Image.fromarray(np.ascontiguousarray(rgb)).resize((side, side), Image.Resampling.BOX),
                      dtype=np.uint8)


def color_distance(a: np.ndarray, b: np.ndarray, mirrored: bool = False) -> float:
    """Mean absolute difference of two thumbnails (0-255), one of them flipped for a mirrored copy."""
    b = b[:, ::-1] if mirrored else b
    return float(np.abs(a.astype(np.float32) - b.astype(np.float32)).mean())


def _hamming_block(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    out = np.zeros((len(a), len(b)), dtype=np.uint16)
    for w in range(a.shape[1]):
        out += np.bitwise_count(a[:, w, None] ^ b[None, :, w])
    return out


def hamming_pairs(a: np.ndarray, max_bits: int, *, b: np.ndarray | None = None,
                  block_rows: int = 256) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(i, j, bits) with popcount(a[i] ^ b[j]) <= max_bits, in row blocks (10k photos: ~25 MB at a time).

    Without `b`, compares `a` with itself and returns i < j only; with `b`, every i != j (the mirror check,
    where the two directions differ).
    """
    a = np.ascontiguousarray(a, dtype=np.uint64)
    other = a if b is None else np.ascontiguousarray(b, dtype=np.uint64)
    found: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    for s in range(0, len(a), block_rows):
        start = s if b is None else 0  # self-comparison: the upper triangle is enough
        d = _hamming_block(a[s:s + block_rows], other[start:])
        ii, jj = np.nonzero(d <= max_bits)
        keep = jj + start > ii + s if b is None else jj != ii + s
        ii, jj = ii[keep], jj[keep]
        found.append((ii + s, jj + start, d[ii, jj]))
    if not found:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.uint16)
    return tuple(np.concatenate(x) for x in zip(*found))  # type: ignore[return-value]


def duplicate_pairs(hashes: np.ndarray, max_bits: int, *, mirrors: np.ndarray | None = None,
                    valid: np.ndarray | None = None, thumbs: np.ndarray | None = None,
                    max_color: float = float("inf")) -> pd.DataFrame:
    """Rows (i, j, distance, mirrored) with i < j: the smaller of the direct and mirrored Hamming distances,
    kept when the colour thumbnails (if given) also agree within `max_color`."""
    idx = np.arange(len(hashes)) if valid is None else np.flatnonzero(valid)
    parts = [pd.DataFrame(dict(zip("ijd", hamming_pairs(hashes[idx], max_bits))), dtype=np.int64).assign(m=False)]
    if mirrors is not None and len(idx):
        i, j, d = hamming_pairs(hashes[idx], max_bits, b=mirrors[idx])
        parts.append(pd.DataFrame({"i": np.minimum(i, j), "j": np.maximum(i, j), "d": d}, dtype=np.int64)
                     .assign(m=True))
    df = pd.concat(parts, ignore_index=True).sort_values(["i", "j", "d", "m"])
    df = df.drop_duplicates(["i", "j"], keep="first")
    out = pd.DataFrame({"i": idx[df["i"].to_numpy()], "j": idx[df["j"].to_numpy()],
                        "distance": df["d"].to_numpy(), "mirrored": df["m"].to_numpy(dtype=bool)})
    if thumbs is None or out.empty:
        return out
    color = [color_distance(thumbs[i], thumbs[j], m) for i, j, m in zip(out["i"], out["j"], out["mirrored"])]
    return out[np.asarray(color) <= max_color].reset_index(drop=True)


# ------------------------------------------------------------------------------------------ face descriptors

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

    def combined(self, flip_average: bool = True) -> np.ndarray:
        return (self.vector + self.mirrored) / 2 if flip_average else self.vector


class FaceDescriber:
    """dlib's HOG detector, 5-point landmarks and ResNet descriptor (+ the mmod CNN on demand).

    Native dlib objects are not thread-safe: make one per process (the pool does) and never share it.
    """

    def __init__(self, settings: AuditSettings = AuditSettings()):
        dlib = _import_dlib()
        models = models_dir()
        need = [models / "shape_predictor_5_face_landmarks.dat", models / "dlib_face_recognition_resnet_model_v1.dat"]
        if missing := [p.name for p in need if not p.exists()]:
            raise ImportError(f"{', '.join(missing)} not found in {models}: reinstall face-recognition-models==0.3.0")
        self.settings = settings
        self._dlib = dlib
        self.hog = dlib.get_frontal_face_detector()
        self.landmarks = dlib.shape_predictor(str(need[0]))
        self.net = dlib.face_recognition_model_v1(str(need[1]))
        self._cnn = None

    def _cnn_detector(self):
        if self._cnn is None:
            self._cnn = self._dlib.cnn_face_detection_model_v1(str(models_dir() / "mmod_human_face_detector.dat"))
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

    Rows with NaN (no descriptor) are skipped. Distances are screened with one matrix product per block and the
    survivors recomputed exactly, so results do not depend on the block size.
    """
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


# ------------------------------------------------------------------------------------------------- cache

def _dlib_version() -> str:
    from importlib import metadata

    for dist in ("dlib-bin", "dlib"):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return _import_dlib().__version__


def _face_fingerprint(s: AuditSettings, memo: Path) -> dict[str, Any]:
    """What a descriptor depends on besides the photo: the weights (hashed, memoised), dlib, the knobs."""
    models = models_dir()
    names = ["shape_predictor_5_face_landmarks.dat", "dlib_face_recognition_resnet_model_v1.dat"]
    names += ["mmod_human_face_detector.dat"] if s.cnn_fallback else []
    return {"dlib": _dlib_version(), "weights": {n: file_hash(models / n, memo) for n in names},
            "max_upsample": s.max_upsample, "cnn_fallback": s.cnn_fallback, "max_side": s.max_side}


class SignatureCache:
    """One small JSON file per (photo content, kind, parameters), written atomically (tmp + rename)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    @staticmethod
    def key(kind: str, photo_sha: str, params: dict[str, Any]) -> str:
        blob = json.dumps({"kind": kind, "photo": photo_sha, "params": params}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()

    def _path(self, kind: str, key: str) -> Path:
        return self.root / kind / key[:2] / f"{key}.json"

    def get(self, kind: str, key: str) -> dict[str, Any] | None:
        try:
            return json.loads(self._path(kind, key).read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def put(self, kind: str, key: str, record: dict[str, Any]) -> None:
        path = self._path(kind, key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(record))
        tmp.replace(path)


# ------------------------------------------------------------------------------------- computing, in a pool

_STATE: dict[str, Any] = {}


def _init_worker(settings: dict[str, Any]) -> None:
    _STATE.clear()
    _STATE["settings"] = AuditSettings(**settings)


def _decode(src: str | bytes, max_side: int) -> np.ndarray:
    """RGB, EXIF-transposed, downscaled to max_side (hash and detector cost then stay bounded)."""
    from PIL import Image

    rgb = open_rgb(src, draft=2 * max_side)
    h, w = rgb.shape[:2]
    if max(h, w) > max_side:
        scale = max_side / max(h, w)
        im = Image.fromarray(rgb).resize((max(1, round(w * scale)), max(1, round(h * scale))),
                                         Image.Resampling.LANCZOS)
        rgb = np.asarray(im)
    return rgb


def _compute_one(item: tuple[int, str, bool, bool]) -> tuple[int, dict | None, dict | None]:
    """Worker: decode once, then hash and/or describe. Undecodable photos come back as reason codes."""
    i, path, want_hash, want_face = item
    s: AuditSettings = _STATE["settings"]
    try:
        rgb = _decode(path, s.max_side)
    except BadImage as e:
        bad = {"status": e.reason}
        return i, bad if want_hash else None, bad if want_face else None
    h = f = None
    if want_hash:
        h = {"status": "ok",
             "hash": perceptual_hash(rgb, size=s.hash_image, block=s.hash_block).tobytes().hex(),
             "mirror": perceptual_hash(rgb, size=s.hash_image, block=s.hash_block, mirror=True).tobytes().hex(),
             "thumb": color_thumbnail(rgb).tobytes().hex()}
    if want_face:
        if "describer" not in _STATE:
            _STATE["describer"] = FaceDescriber(s)
        d = _STATE["describer"].describe(rgb)
        f = {"status": "ok", "source": d.source, "detector": d.detector, "upsample": d.upsample,
             "descriptor": [float(v) for v in d.vector], "mirrored": [float(v) for v in d.mirrored]}
    return i, h, f


def _run_pool(items: list[tuple[int, str, bool, bool]], s: AuditSettings, workers: int, progress: bool):
    """Yield results as they finish: a process pool (dlib per process), or in-process for one worker."""
    from concurrent.futures import ProcessPoolExecutor, as_completed

    from tqdm.auto import tqdm

    bar = tqdm(total=len(items), desc="audit", unit="photo", disable=not progress)
    try:
        if workers <= 1 or len(items) <= 1:
            _init_worker(asdict(s))
            for it in items:
                yield _compute_one(it)
                bar.update()
            return
        with ProcessPoolExecutor(min(workers, len(items)), initializer=_init_worker,
                                 initargs=(asdict(s),)) as pool:
            for fut in as_completed([pool.submit(_compute_one, it) for it in items]):
                yield fut.result()
                bar.update()
    finally:
        bar.close()


@dataclass(frozen=True)
class Signatures:
    """Per photo, in input order. Photos that could not be read have status != "ok" and no hash/descriptor."""

    status: list[str]  # "ok" or a reason code (file_not_found, not_an_image, truncated, ...)
    hashes: np.ndarray  # [N, W] uint64 (zeros where status != ok)
    mirrors: np.ndarray  # [N, W] uint64, hash of the mirrored photo
    descriptors: np.ndarray | None  # [N, 128] float32, NaN where none; None when faces were not computed
    source: list[str]  # detected | whole_image | "" per photo
    detector: list[str]  # hog | cnn | ""
    cached: int  # photos served entirely from the cache
    computed: int  # photos decoded in this call
    seconds: float
    thumbs: np.ndarray | None = None  # [N, 8, 8, 3] uint8 colour thumbnails (zeros where status != ok)

    @property
    def ok(self) -> np.ndarray:
        return np.array([s == "ok" for s in self.status], dtype=bool)


def _cpus() -> int:
    """CPUs this process may use (the container's share, not the host's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _photo_shas(paths: Sequence[str]) -> list[str | None]:
    out: list[str | None] = []
    for p in paths:
        try:
            out.append(sha256_file(p))
        except OSError:
            out.append(None)
    return out


def _lookup(cache: SignatureCache, shas, s: AuditSettings, memo: Path) -> tuple[list, list, list, list]:
    """Cache keys and hits for every photo; None keys for photos whose bytes could not be read."""
    hp = {"v": HASH_VERSION, "size": s.hash_image, "block": s.hash_block, "max_side": s.max_side}
    fp = {"v": FACE_VERSION, **_face_fingerprint(s, memo)} if s.faces else None
    hkeys = [cache.key("hash", sha, hp) if sha else None for sha in shas]
    fkeys = [cache.key("face", sha, fp) if sha and fp else None for sha in shas]
    hrec = [cache.get("hash", k) if k else None for k in hkeys]
    frec = [cache.get("face", k) if k else None for k in fkeys]
    return hkeys, fkeys, hrec, frec


def photo_signatures(paths: Sequence[str | Path], settings: AuditSettings = AuditSettings(), *,
                     shas: Sequence[str | None] | None = None, cache_dir: str | Path | None = None,
                     workers: int = 0, progress: bool = True) -> Signatures:
    """Hashes (and descriptors when settings.faces) for each photo, from the cache or computed on a pool."""
    t0 = time.perf_counter()
    paths = [str(p) for p in paths]
    shas = list(shas) if shas is not None else _photo_shas(paths)
    cache = SignatureCache(cache_dir or _default_cache())
    hkeys, fkeys, hrec, frec = _lookup(cache, shas, settings, cache.root / "weights_hashes.json")
    items = [(i, p, hrec[i] is None, settings.faces and frec[i] is None)
             for i, p in enumerate(paths) if shas[i] and (hrec[i] is None or (settings.faces and frec[i] is None))]
    for i, h, f in _run_pool(items, settings, workers or _cpus(), progress):
        if h is not None:
            cache.put("hash", hkeys[i], h)
            hrec[i] = h
        if f is not None:
            cache.put("face", fkeys[i], f)
            frec[i] = f
    for i, sha in enumerate(shas):
        if sha is None:
            hrec[i] = frec[i] = {"status": "file_not_found" if not Path(paths[i]).exists() else "unreadable"}
    return _assemble(hrec, frec if settings.faces else None, settings, len(paths) - len(items), len(items),
                     time.perf_counter() - t0)


def _assemble(hrec: list[dict], frec: list[dict] | None, s: AuditSettings, cached: int, computed: int,
              seconds: float) -> Signatures:
    words = s.hash_block ** 2 // 64
    hashes = np.zeros((len(hrec), words), np.uint64)
    mirrors = np.zeros_like(hashes)
    thumbs = np.zeros((len(hrec), 8, 8, 3), np.uint8)
    for i, r in enumerate(hrec):
        if r["status"] == "ok":
            hashes[i] = np.frombuffer(bytes.fromhex(r["hash"]), np.uint64)
            mirrors[i] = np.frombuffer(bytes.fromhex(r["mirror"]), np.uint64)
            thumbs[i] = np.frombuffer(bytes.fromhex(r["thumb"]), np.uint8).reshape(8, 8, 3)
    desc = None
    source = detector = [""] * len(hrec)
    if frec is not None:
        desc = np.full((len(frec), 128), np.nan, np.float32)
        source, detector = [], []
        for i, r in enumerate(frec):
            ok = r["status"] == "ok"
            if ok:
                v = np.asarray(r["descriptor"], np.float32)
                desc[i] = (v + np.asarray(r["mirrored"], np.float32)) / 2 if s.flip_average else v
            source.append(r.get("source", "") if ok else "")
            detector.append(r.get("detector", "") if ok else "")
    return Signatures([r["status"] for r in hrec], hashes, mirrors, desc, source, detector, cached, computed,
                      seconds, thumbs)


def _default_cache() -> Path:
    return cache_home() / "audit"


# ---------------------------------------------------------------------------------------------- the audit

@dataclass(frozen=True)
class CohortAudit:
    """`pairs` is audit.csv: one row per suspicious pair, PHI-safe (CSV lines and keyed subject hashes only).

    A copy of a photo under another id appears twice, as `duplicate_photo` and as `same_person`: two questions.
    `detail` is `mirrored` for a flipped copy and `whole_image` for a same-person pair where a photo had no
    detected face (less reliable: the whole frame stood in for the face box).
    """

    pairs: pd.DataFrame  # kind, distance, line_a, line_b, subject_a, subject_b[, split_a, split_b, straddles_splits]
    photos: pd.DataFrame  # one row per manifest row: line, subject, status, descriptor_source, detector
    settings: AuditSettings
    cached: int
    computed: int
    seconds: float

    def summary(self) -> dict[str, float]:
        """Counts a tracking step can log as metrics (finite numbers, no names)."""
        p, ph = self.pairs, self.photos
        out = {f"audit/{k}_pairs": float((p["kind"] == k).sum()) for k in PAIR_KINDS}
        if "straddles_splits" in p:
            out.update({f"audit/{k}_pairs_straddling": float(((p["kind"] == k) & p["straddles_splits"]).sum())
                        for k in PAIR_KINDS})
        out["audit/unreadable_photos"] = float((ph["status"] != "ok").sum())
        groups = merged_groups(p, ph["subject"])  # hashed ids merge the same way as raw ones
        out["audit/merged_subjects"] = float(ph["subject"].nunique() - groups.nunique())
        out["audit/largest_merged_group"] = float(ph.groupby(groups)["subject"].nunique().max()) if len(ph) else 0.0
        if self.settings.faces:
            ok = ph["status"] == "ok"
            out["audit/face_detected_rate"] = float((ph.loc[ok, "descriptor_source"] == "detected").mean()) \
                if ok.any() else 0.0
        return out


def _pairs_frame(rows: list[pd.DataFrame], subjects: pd.Series, split: pd.Series | None) -> pd.DataFrame:
    cols = ["kind", "distance", "line_a", "line_b", "subject_a", "subject_b"]
    df = pd.concat(rows, ignore_index=True) if rows else pd.DataFrame(columns=["kind", "i", "j", "distance"])
    i, j = df["i"].to_numpy(dtype=np.int64), df["j"].to_numpy(dtype=np.int64)
    out = pd.DataFrame({"kind": df["kind"].astype(str), "distance": df["distance"].astype(float),
                        "line_a": i + 2, "line_b": j + 2,  # the CSV header is line 1
                        "subject_a": subjects.to_numpy()[i], "subject_b": subjects.to_numpy()[j]})
    out["same_subject"] = out["subject_a"] == out["subject_b"]
    out["detail"] = df["detail"].fillna("").astype(str).to_numpy() if len(df) else []
    if split is not None:
        sp = split.astype(str).to_numpy()
        out["split_a"], out["split_b"] = sp[i], sp[j]
        out["straddles_splits"] = out["split_a"] != out["split_b"]
        cols += ["split_a", "split_b", "straddles_splits"]
    out = out[cols + ["same_subject", "detail"]]
    return out.sort_values(["kind", "distance", "line_a", "line_b"], ignore_index=True)


def _find_pairs(sig: Signatures, subject_ids: np.ndarray, s: AuditSettings) -> list[pd.DataFrame]:
    dup = duplicate_pairs(sig.hashes, s.duplicate_max_bits, mirrors=sig.mirrors if s.mirror else None,
                          valid=sig.ok, thumbs=sig.thumbs, max_color=s.duplicate_max_color)
    rows = [dup.assign(kind="duplicate_photo", detail=np.where(dup["mirrored"], "mirrored", ""))
            .drop(columns="mirrored")]
    if sig.descriptors is not None:
        i, j, d = descriptor_pairs(sig.descriptors, s.same_person_max_distance, groups=subject_ids)
        src = np.asarray(sig.source)
        detail = np.where((src[i] == "detected") & (src[j] == "detected"), "", "whole_image")
        rows.append(pd.DataFrame({"kind": "same_person", "i": i, "j": j, "distance": d, "detail": detail}))
    return [r for r in rows if len(r)]


def audit_manifest(manifest: Manifest | pd.DataFrame, *, settings: AuditSettings = AuditSettings(),
                   split: pd.Series | None = None, key: str | None = None, cache_dir: str | Path | None = None,
                   workers: int = 0, progress: bool = True) -> CohortAudit:
    """Audit a cohort: a `Manifest`, or a table in manifest row order with `path` (or absolute `image`) and
    `subject_id`. `split` (one per row) defaults to the table's split column; subject hashes are keyed with `key`,
    else the cohort's `subject_key` (the photos' content), as training keys them."""
    table = (manifest.table if isinstance(manifest, Manifest) else manifest).reset_index(drop=True)
    paths = table["path"] if "path" in table else table["image"]
    has_sha = "sha256" in table and table["sha256"].notna().all()
    shas = list(table["sha256"]) if has_sha else _photo_shas(list(paths))
    sig = photo_signatures(list(paths), settings, shas=shas, cache_dir=cache_dir, workers=workers,
                           progress=progress)
    key = key or subject_key(shas)
    raw = table["subject_id"].astype(str)
    subjects = raw.map(lambda x: hash_subject(x, key))
    if split is None and "split" in table and (table["split"].astype(str).str.strip() != "").all():
        split = table["split"]
    split = None if split is None else pd.Series(split).reset_index(drop=True)
    pairs = _pairs_frame(_find_pairs(sig, raw.to_numpy(), settings), subjects, split)
    photos = pd.DataFrame({"line": np.arange(len(table)) + 2, "subject": subjects, "status": sig.status,
                           "descriptor_source": sig.source, "detector": sig.detector})
    return CohortAudit(pairs, photos, settings, sig.cached, sig.computed, sig.seconds)


def merged_groups(pairs: pd.DataFrame, subject_ids: Sequence | pd.Series, *,
                  kinds: Iterable[str] = PAIR_KINDS) -> pd.Series:
    """Group id per manifest row: subjects joined by any pair (transitively, union-find) share one id.

    The id is the smallest raw subject id in the group, so unmerged subjects keep their own and a splitter can
    group on this instead of `subject_id`. Internal use only: the ids are raw, do not log them.
    """
    subj = pd.Series(subject_ids).reset_index(drop=True).astype(str)
    parent = {s: s for s in subj.unique()}

    def find(x: str) -> str:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    sel = pairs[pairs["kind"].isin(list(kinds))]
    for a, b in zip(sel["line_a"].to_numpy() - 2, sel["line_b"].to_numpy() - 2):
        ra, rb = find(subj.iat[int(a)]), find(subj.iat[int(b)])
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)  # the smaller id becomes the root, so it names the group
    out = subj.map(find)
    out.index = pd.Series(subject_ids).index
    return out


# ---------------------------------------------------------------------------------------------- evaluation

def _read_celeba(manifest_csv: str | Path) -> pd.DataFrame:
    path = Path(manifest_csv)
    df = pd.read_csv(path, dtype=str, keep_default_na=False)
    df["path"] = [str(p if Path(p).is_absolute() else path.parent / p) for p in df["image"]]
    return df[["path", "subject_id", "sex"]]


def _sample(df: pd.DataFrame, n_photos: int, seed: int, multi_share: float = 0.8) -> pd.DataFrame:
    """Whole identities with >= 2 photos up to multi_share of n (the same-person pairs), then single photos
    of other identities (strangers only) to fill up."""
    rng = np.random.default_rng(seed)
    counts = df["subject_id"].value_counts()
    multi = counts[counts >= 2].index.to_numpy()
    rng.shuffle(multi)
    take, n = [], 0
    for s in multi:
        if n + counts[s] > multi_share * n_photos:
            continue
        take.append(s)
        n += counts[s]
    chosen = df[df["subject_id"].isin(take)]
    rest = df[~df["subject_id"].isin(take)].drop_duplicates("subject_id")
    fill = rest.sample(min(len(rest), max(0, n_photos - len(chosen))), random_state=seed)
    return pd.concat([chosen, fill], ignore_index=True)


def _rate(k: int, n: int) -> tuple[float, float, float]:
    lo, hi = wilson(int(k), int(n))
    return (k / n if n else float("nan")), lo, hi


def _threshold_rows(d: np.ndarray, same: np.ndarray, group: str, thresholds: Sequence[float]) -> list[dict]:
    pos, neg = np.sort(d[same]), np.sort(d[~same])
    rows = []
    for t in thresholds:
        tp = int(np.searchsorted(pos, t, side="left"))
        fp = int(np.searchsorted(neg, t, side="left"))
        p, plo, phi = _rate(tp, tp + fp)
        r, rlo, rhi = _rate(tp, len(pos))
        f, flo, fhi = _rate(fp, len(neg))
        rows.append({"threshold": float(t), "group": group, "pos_pairs": len(pos), "neg_pairs": len(neg),
                     "tp": tp, "fp": fp, "precision": p, "precision_lo": plo, "precision_hi": phi,
                     "recall": r, "recall_lo": rlo, "recall_hi": rhi, "false_match_rate": f,
                     "fmr_lo": flo, "fmr_hi": fhi, "false_pairs_per_343": f * 343 * 342 / 2})
    return rows


@dataclass(frozen=True)
class SamePersonEvaluation:
    table: pd.DataFrame  # threshold x group (all, F, M, both_detected): precision, recall, false-match rate
    photos: int
    identities: int
    detected_rate: float  # share of readable photos whose descriptor came from a detected face
    detector_counts: dict[str, int]
    seconds: float


def evaluate_same_person(manifest_csv: str | Path, *, n_photos: int = 2000, seed: int = 0,
                         thresholds: Sequence[float] = tuple(np.round(np.arange(0.30, 0.651, 0.025), 3)),
                         settings: AuditSettings = AuditSettings(), cache_dir: str | Path | None = None,
                         workers: int = 0, progress: bool = True) -> SamePersonEvaluation:
    """Precision/recall of "same person" (distance < t) over all pairs of a sample of real identities, overall
    and by sex (both photos that sex), with Wilson 95% intervals: the evidence behind the default threshold."""
    df = _sample(_read_celeba(manifest_csv), n_photos, seed)
    sig = photo_signatures(df["path"].tolist(), settings, cache_dir=cache_dir, workers=workers, progress=progress)
    keep = sig.ok & np.isfinite(sig.descriptors).all(axis=1)
    df = df[keep].reset_index(drop=True)
    x = sig.descriptors[keep].astype(np.float64)
    src = np.asarray(sig.source)[keep]
    iu, ju = np.triu_indices(len(df), 1)
    sq = (x * x).sum(axis=1)
    d = np.sqrt(np.maximum(sq[:, None] + sq[None, :] - 2.0 * (x @ x.T), 0.0))[iu, ju]  # n x n, not pairs x 128
    subj, sex = df["subject_id"].to_numpy(), df["sex"].to_numpy()
    same = subj[iu] == subj[ju]
    rows = _threshold_rows(d, same, "all", thresholds)
    masks = {"F": (sex[iu] == "F") & (sex[ju] == "F"), "M": (sex[iu] == "M") & (sex[ju] == "M"),
             "both_detected": (src[iu] == "detected") & (src[ju] == "detected")}
    for g, m in masks.items():
        rows += _threshold_rows(d[m], same[m], g, thresholds)
    det = pd.Series(sig.detector)[keep].replace("", "whole_image").value_counts().to_dict()
    return SamePersonEvaluation(pd.DataFrame(rows), len(df), df["subject_id"].nunique(),
                                float((src == "detected").mean()), {str(k): int(v) for k, v in det.items()},
                                sig.seconds)


def _variants(data: bytes) -> dict[str, bytes]:
    """Re-saved copies a cohort could plausibly contain, made in memory (never written anywhere)."""
    import io

    from PIL import Image

    im = Image.open(io.BytesIO(data))
    im.load()

    def save(x, fmt: str, **kw) -> bytes:
        b = io.BytesIO()
        x.save(b, fmt, **kw)
        return b.getvalue()

    small = im.resize((round(im.width * 0.7), round(im.height * 0.7)), Image.Resampling.BILINEAR)
    return {"png": save(im, "PNG"), "jpeg_q60": save(im, "JPEG", quality=60),
            "resize_0.7": save(small, "JPEG", quality=90), "resize_0.7_q60": save(small, "JPEG", quality=60),
            "png_then_0.7_then_q60": save(Image.open(io.BytesIO(save(im, "PNG"))).resize(small.size), "JPEG",
                                          quality=60),
            "upscale_3x_png": save(im.resize((im.width * 3, im.height * 3), Image.Resampling.BICUBIC), "PNG"),
            "resize_0.5_q40": save(im.resize((im.width // 2, im.height // 2), Image.Resampling.BILINEAR),
                                   "JPEG", quality=40),
            "mirrored_q90": save(im.transpose(Image.Transpose.FLIP_LEFT_RIGHT), "JPEG", quality=90)}


def _copy_distances(paths: Sequence[str], hashes: np.ndarray, mirrors: np.ndarray,
                    s: AuditSettings) -> pd.DataFrame:
    rows = []
    for p, h, m in zip(paths, hashes, mirrors):
        original = color_thumbnail(_decode(p, s.max_side))
        for name, data in _variants(Path(p).read_bytes()).items():
            rgb = _decode(data, s.max_side)
            c = perceptual_hash(rgb, size=s.hash_image, block=s.hash_block)
            direct, flipped = int(np.bitwise_count(c ^ h).sum()), int(np.bitwise_count(c ^ m).sum())
            mirrored = s.mirror and flipped < direct
            rows.append({"variant": name, "bits": flipped if mirrored else direct,
                         "color": color_distance(original, color_thumbnail(rgb), mirrored)})
    return pd.DataFrame(rows)


def _distance_histograms(hashes: np.ndarray, mirrors: np.ndarray | None, subjects: np.ndarray,
                         block_rows: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Counts of pairs (i < j) at each Hamming distance, strangers and same identity apart (min over mirror)."""
    bits = hashes.shape[1] * 64
    codes = pd.factorize(subjects)[0]
    hist = np.zeros((2, bits + 1), np.int64)
    cols = np.arange(len(hashes))
    for s in range(0, len(hashes), block_rows):
        rows = cols[s:s + block_rows]
        d = _hamming_block(hashes[rows], hashes)
        if mirrors is not None:
            d = np.minimum(d, _hamming_block(hashes[rows], mirrors))
            d = np.minimum(d, _hamming_block(mirrors[rows], hashes))
        upper = cols[None, :] > rows[:, None]
        same = codes[rows][:, None] == codes[None, :]
        hist[0] += np.bincount(d[upper & ~same], minlength=bits + 1)
        hist[1] += np.bincount(d[upper & same], minlength=bits + 1)
    return hist[0], hist[1]


def evaluate_duplicates(manifest_csv: str | Path, *, n_photos: int | None = 300, n_copies: int = 100,
                        seed: int = 0, settings: AuditSettings = AuditSettings(),
                        cache_dir: str | Path | None = None, workers: int = 0,
                        progress: bool = True) -> dict[str, Any]:
    """False pairs among distinct photos of different identities (cannot be the same photo) at the threshold,
    the closest such pair, and how far re-saved copies drift (PNG, JPEG q60, 0.7x, 3x, 0.5x q40, mirrored),
    the copies made in memory and never written."""
    df = _read_celeba(manifest_csv)
    if n_photos is not None and n_photos < len(df):
        df = df.sample(n_photos, random_state=seed)
    df = df.reset_index(drop=True)
    s = dataclasses.replace(settings, faces=False)
    sig = photo_signatures(df["path"].tolist(), s, cache_dir=cache_dir, workers=workers, progress=progress)
    ok = sig.ok
    strangers, same = _distance_histograms(sig.hashes[ok], sig.mirrors[ok] if s.mirror else None,
                                           df["subject_id"].to_numpy()[ok])
    fp = int(strangers[:s.duplicate_max_bits + 1].sum())
    copies = _copy_distances(df["path"].head(n_copies).tolist(), sig.hashes, sig.mirrors, s)
    nz = np.flatnonzero(strangers)
    return {"photos": int(ok.sum()), "stranger_pairs": int(strangers.sum()), "threshold_bits": s.duplicate_max_bits,
            "false_pairs": fp, "false_pair_rate": _rate(fp, int(strangers.sum())),
            "min_stranger_bits": int(nz[0]) if len(nz) else None,
            "stranger_bits_quantiles": {q: int(np.searchsorted(np.cumsum(strangers), q * strangers.sum()))
                                        for q in (1e-6, 1e-5, 1e-4, 1e-3, 0.5)},
            "same_identity_pairs_flagged": int(same[:s.duplicate_max_bits + 1].sum()),
            "copies": copies.groupby("variant")[["bits", "color"]].agg(["max", "mean"]).reset_index(),
            "copies_found": float(((copies["bits"] <= s.duplicate_max_bits)
                                   & (copies["color"] <= s.duplicate_max_color)).mean()), "seconds": sig.seconds}
