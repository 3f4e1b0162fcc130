"""Face extraction over a manifest, as in the paper: dlib detection and 68 landmarks, eyes levelled, a crop that
keeps forehead and chin, a Segment Anything mask (or the landmark hull, recorded as such), white background, white
border trimmed, 224 px. A photo that gives no crop gets a reason code, and stops the stage (naming each one) unless
the caller leaves such photos out (skip_bad_photos).

Crops are cached by content: one PNG and one JSON record per (photo bytes, settings, model weights), written
atomically. Writes only to the output and cache folders it is given. dlib runs on a process pool, SAM batched in
this process on the device; both are imported lazily, and a run over cached photos loads no model at all.
"""
from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from cushing import stops
from cushing.config import cache_home
from cushing.data.imageio import BadImage, open_rgb
from cushing.data.manifest import REQUIRED, load_manifest, sha256_file, skipped_counts, subject_key
from cushing.data.weights import file_hash, landmark_model_path, models_dir
from cushing.private import private_dir
from cushing.faces.detect import Detection, FaceResult, _Dlib, _result, _unprompted, detect, sam_prompt
from cushing.faces.sam import SamMasker
from cushing.faces.settings import REASONS, SETTINGS_FILE, FaceSettings

__all__ = ["extract_faces", "FacesOutcome", "BadPhotos", "weights_fingerprint", "cache_key"]


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


class _Cache:
    def __init__(self, root: Path):
        self.root = private_dir(root, narrow=True)  # face crops: this account's only (cushing.private)

    def _paths(self, key: str) -> tuple[Path, Path]:
        d = self.root / key[:2]
        return d / f"{key}.png", d / f"{key}.json"

    def get(self, key: str) -> dict | None:
        png, meta = self._paths(key)
        if not meta.exists():
            return None
        rec = json.loads(meta.read_text())
        return None if rec["status"] == "ok" and not png.exists() else rec

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
    return i, d if s.mask_method == "sam" else _unprompted(d, s)


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

    @property
    def skipped(self) -> pd.DataFrame:
        return _no_crop(self.report)


def _no_crop(report: pd.DataFrame) -> pd.DataFrame:
    """The photos that gave no crop (a duplicate of another photo's pixels is no loss: not one of them)."""
    return report[(report["status"] != "ok") & (report["reason"] != "duplicate_of")]


class BadPhotos(ValueError):
    """Photos that gave no face crop (no face, two faces, an empty mask, unreadable): the stage stops before it
    writes anything, naming each one, unless told to leave them out (skip_bad_photos)."""

    def __init__(self, manifest: str | Path, bad: pd.DataFrame, total: int):
        tally = ", ".join(f"{n} {reason}" for reason, n in bad["reason"].value_counts().items())
        listed = "\n  ".join(f"line {r.line}: {r.image}: {r.reason}: {r.detail}" for r in bad.itertuples())
        super().__init__(f"{manifest}: {len(bad)} of {total} photos give no face crop ({tally}); replace or remove "
                         f"them, or leave them out with --skip-bad-photos true:\n  {listed}")


def extract_faces(manifest: str | Path, out_dir: str | Path, settings: FaceSettings, *,
                  cache_dir: str | Path | None = None, workers: int = 0, progress: bool = True,
                  skip_bad_photos: bool = False) -> FacesOutcome:
    """Extract every photo of a manifest into out_dir: crops/, manifest.csv, faces_report.csv, faces_settings.json.
    A manifest with a problem (a photo that cannot be found or read, unless skip_bad_photos) is refused before
    anything is written; so is one with photos that give no crop (`BadPhotos`), unless skip_bad_photos."""
    t0 = time.perf_counter()
    m = load_manifest(manifest, skip_bad_photos=skip_bad_photos)
    table, shas = m.table, m.table["sha256"].tolist()
    cache = _Cache(Path(cache_dir) if cache_dir else cache_home() / "faces")
    fp = weights_fingerprint(settings, cache.root / "weights_hashes.json")
    keys = [cache_key(s, settings, fp) for s in shas]
    records = {i: rec for i, key in enumerate(keys) if (rec := cache.get(key)) is not None}
    todo = [i for i in range(len(table)) if i not in records]
    records.update(_process_all(table, todo, keys, settings, cache, workers, progress))
    report, crops, crop_keys = _assemble(m, records, keys, cache)
    bad = _no_crop(report)
    if len(bad) and not skip_bad_photos:
        raise BadPhotos(manifest, bad, len(report))
    out = Path(out_dir)
    _link_crops(crops, crop_keys, cache, private_dir(private_dir(out) / "crops", narrow=True))
    fm = out / "manifest.csv"
    crops.to_csv(fm, index=False)  # with its header even when no photo gave a crop
    report.to_csv(out / "faces_report.csv", index=False)
    (out / SETTINGS_FILE).write_text(json.dumps({**settings.to_dict(), "mask_method": settings.mask_method,
                                                 "weights": fp, "skipped": skipped_counts(bad)}, indent=1))
    key = subject_key(shas) if shas else secrets.token_hex(32)  # no readable photo: a key nobody can rebuild
    return FacesOutcome(fm, report, settings, len(table) - len(todo), len(todo), time.perf_counter() - t0, key)


def _process_all(table, todo, keys, settings, cache, workers, progress) -> dict[int, dict]:
    from tqdm.auto import tqdm

    if not todo:
        return {}
    out: dict[int, dict] = {}
    with tqdm(total=len(todo), desc="faces", unit="photo", disable=not progress) as bar, stops.cooperative():
        for i, rec in _process(table, todo, keys, settings, cache, workers):
            bar.update(1)
            out[i] = rec
    return out


def _process(table, todo, keys, settings, cache, workers):
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
        done = [(i, cache.put(keys[i], _result(d, mask, score, settings)))
                for (i, d), (mask, score) in zip(pending, res)]
        pending.clear()
        return done

    args = (settings.to_dict(),)
    if workers == 1:
        _init_worker(*args)
    pool = ProcessPoolExecutor(workers, initializer=_init_worker, initargs=args) if workers > 1 else None
    results = pool.map(_detect_one, items, chunksize=4) if pool else map(_detect_one, items)
    try:
        for i, res in results:
            stops.check()  # a stop keeps every photo cached so far: the rerun goes on from there
            if not isinstance(res, Detection):
                yield i, cache.put(keys[i], res)
                continue
            pending.append((i, res))
            if len(pending) >= 16:
                yield from flush()
        yield from flush()
    finally:
        if pool:
            pool.shutdown(cancel_futures=True)


def _assemble(m, records, keys, cache):
    """The report (every photo, in manifest order: skipped ones too), the face-crop manifest rows (the ones that
    gave a crop) and their cache keys. The same pixels under two names (a JPEG and a PNG of one photo) give the
    same crop: the later one is rejected as `duplicate_of` the first, so the crop manifest never holds one face
    twice."""
    table, lines = m.table, m.lines
    extras = [k for k in table.columns if k not in (*REQUIRED, "path", "sha256", "image")]
    report, rows, crop_keys, first = [], [], [], {}
    for i in range(len(table)):
        row, rec = table.iloc[i], records[i]
        if rec["status"] == "ok":
            pixels = sha256_file(cache.crop_path(keys[i]))
            if pixels in first:
                rec = {"status": "duplicate_of", "detail": f"line {first[pixels]}"}
            first.setdefault(pixels, lines[i])
        ok = rec["status"] == "ok"
        report.append({"line": lines[i], "image": row["image"], "path": row["path"], "subject_id": row["subject_id"],
                       "sex": row["sex"], "label": row["label"], "status": "ok" if ok else "rejected",
                       "reason": "" if ok else rec["status"],
                       "detail": "" if ok else (rec.get("detail") or REASONS.get(rec["status"], ""))})
        if ok:
            crop_keys.append(keys[i])
            rows.append({"image": f"crops/{row['sha256'][:20]}.png", "label": int(row["label"]),
                         "sex": row["sex"], **{k: row[k] for k in extras}, "source_image": row["path"],
                         **{k: v for k, v in rec.items() if k.startswith("face_")}})
    cols = ["line", "image", "path", "subject_id", "sex", "label", "status", "reason", "detail"]
    report = pd.DataFrame(report, columns=cols)
    if len(m.skipped):  # the photos the manifest check left out (skip_bad_photos): rejected with their reason
        skipped = m.skipped.assign(status="rejected", detail=[d or REASONS.get(r, "") for r, d in
                                                              zip(m.skipped["reason"], m.skipped["detail"])])
        report = pd.concat([report, skipped[cols]], ignore_index=True).sort_values("line", ignore_index=True)
    empty = ["image", "label", "sex", *extras, "source_image"]
    return report, pd.DataFrame(rows, columns=None if rows else empty), crop_keys


def _link_crops(crops: pd.DataFrame, keys: list[str], cache, folder: Path) -> None:
    """The crops of the manifest's rows into `folder` (hard links into the cache, else copies)."""
    for name, key in zip(crops["image"], keys):
        target = folder.parent / name
        if not target.exists():
            try:
                os.link(cache.crop_path(key), target)
            except OSError:
                shutil.copyfile(cache.crop_path(key), target)
