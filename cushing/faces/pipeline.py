"""Face extraction over a manifest, as in the paper: dlib detection and 68 landmarks, eyes levelled, a crop that
keeps forehead and chin, a Segment Anything mask (or the landmark hull, recorded as such), white background, white
border trimmed, 224 px. Cached by content; bad photos get a reason code and the others go on.

Writes only to the output and cache folders it is given. dlib runs on a process pool, SAM batched in this process
on the device; both are imported lazily, and a run over cached photos loads no model at all.
"""
from __future__ import annotations

import json
import os
import secrets
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import pandas as pd

from cushing.data.imageio import BadImage, open_rgb
from cushing.data.manifest import load_manifest, REQUIRED, sha256_file, subject_key
from cushing.private import private_dir
from cushing.faces.cache import _Cache, _default_cache, cache_key, weights_fingerprint
from cushing.faces.detect import Detection, _Dlib, detect
from cushing.faces.mask import _result, hull_mask, sam_prompt
from cushing.faces.sam import SamMasker
from cushing.faces.settings import REASONS, SETTINGS_FILE, FaceSettings

__all__ = ["extract_faces", "FacesOutcome"]


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
    private_dir(private_dir(out) / "crops", narrow=True)
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
