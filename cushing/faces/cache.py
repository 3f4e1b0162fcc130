"""The content-addressed cache of face crops: one PNG and one JSON record per (photo bytes, settings, model
weights), written atomically, so a rerun over cached photos loads no model at all."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from cushing.config import cache_home
from cushing.private import private_dir
from cushing.data.weights import file_hash, landmark_model_path, models_dir
from cushing.faces.mask import FaceResult
from cushing.faces.settings import FaceSettings

__all__ = ["weights_fingerprint", "cache_key"]


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


def _default_cache() -> Path:
    return cache_home() / "faces"
