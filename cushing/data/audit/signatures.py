"""Every photo's signatures (hashes, thumbnail, face descriptors), computed once on a process pool (dlib per
process) and cached per photo content (sha256 of the bytes) in small JSON files written atomically, so a rerun
over the same cohort decodes nothing."""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from cushing import stops
from cushing.config import cache_home
from cushing.data.audit.descriptors import FaceDescriber, _face_fingerprint
from cushing.data.audit.hashing import color_thumbnail, perceptual_hash
from cushing.data.audit.settings import AuditSettings
from cushing.data.imageio import BadImage, open_rgb
from cushing.data.manifest import sha256_file
from cushing.private import private_dir

__all__ = ["SignatureCache", "Signatures", "photo_signatures"]

HASH_VERSION = 2  # bump when the hash computation changes: old cache entries are then ignored
FACE_VERSION = 2  # 2: the chip aligned with 68-point landmarks (was 5-point): old descriptors are not mixed in


class SignatureCache:
    """One small JSON file per (photo content, kind, parameters), written atomically (tmp + rename)."""

    def __init__(self, root: str | Path):
        self.root = private_dir(root, narrow=True)  # face descriptors: this account's only (cushing.private)

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


_STATE: dict[str, Any] = {}


def _init_worker(settings: dict[str, Any]) -> None:
    _STATE.clear()
    _STATE["settings"] = AuditSettings(**settings)


def _decode(src: str | bytes, max_side: int) -> np.ndarray:
    """RGB, EXIF-transposed, downscaled to max_side (hash and detector cost then stay bounded)."""
    from PIL import Image

    rgb = open_rgb(src, draft=2 * max_side)
    h, w = rgb.shape[:2]
    if max(h, w) <= max_side:
        return rgb
    scale = max_side / max(h, w)
    return np.asarray(Image.fromarray(rgb).resize((max(1, round(w * scale)), max(1, round(h * scale))),
                                                  Image.Resampling.LANCZOS))


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

    bar = tqdm(total=len(items), desc="audit", unit="photo", disable=not progress or not items)  # all cached: none
    pool = None
    try:
        if workers <= 1 or len(items) <= 1:
            _init_worker(asdict(s))
            done = map(_compute_one, items)
        else:
            pool = ProcessPoolExecutor(min(workers, len(items)), initializer=_init_worker, initargs=(asdict(s),))
            done = (fut.result() for fut in as_completed([pool.submit(_compute_one, it) for it in items]))
        for result in done:
            stops.check()  # every signature so far is cached: the rerun goes on from there
            yield result
            bar.update()
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
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
    fingerprint: dict[str, Any] | None = None  # what the descriptors depend on (dlib, weights' sha256, knobs)

    @property
    def ok(self) -> np.ndarray:
        return np.array([s == "ok" for s in self.status], dtype=bool)


def _cpus() -> int:
    """CPUs this process may use (the container's share, not the host's count; all of them off Linux)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _photo_shas(paths: Sequence[str]) -> list[str | None]:
    out: list[str | None] = []
    for p in paths:
        try:
            out.append(sha256_file(p))
        except OSError:
            out.append(None)
    return out


def photo_signatures(paths: Sequence[str | Path], settings: AuditSettings = AuditSettings(), *,
                     shas: Sequence[str | None] | None = None, cache_dir: str | Path | None = None,
                     workers: int = 0, progress: bool = True) -> Signatures:
    """Hashes (and descriptors when settings.faces) for each photo, from the cache or computed on a pool."""
    t0 = time.perf_counter()
    paths = [str(p) for p in paths]
    shas = list(shas) if shas is not None else _photo_shas(paths)
    cache = SignatureCache(cache_dir or cache_home() / "audit")
    s = settings
    hp = {"v": HASH_VERSION, "size": s.hash_image, "block": s.hash_block, "max_side": s.max_side}
    fp = {"v": FACE_VERSION, **_face_fingerprint(s, cache.root / "weights_hashes.json")} if s.faces else None
    hkeys = [cache.key("hash", sha, hp) if sha else None for sha in shas]
    fkeys = [cache.key("face", sha, fp) if sha and fp else None for sha in shas]
    hrec = [cache.get("hash", k) if k else None for k in hkeys]
    frec = [cache.get("face", k) if k else None for k in fkeys]
    items = [(i, p, hrec[i] is None, s.faces and frec[i] is None)
             for i, p in enumerate(paths) if shas[i] and (hrec[i] is None or (s.faces and frec[i] is None))]
    with stops.cooperative():
        for i, h, f in _run_pool(items, s, workers or _cpus(), progress):
            if h is not None:
                cache.put("hash", hkeys[i], h)
                hrec[i] = h
            if f is not None:
                cache.put("face", fkeys[i], f)
                frec[i] = f
    for i, sha in enumerate(shas):
        if sha is None:
            hrec[i] = frec[i] = {"status": "file_not_found" if not Path(paths[i]).exists() else "unreadable"}
    n = len(paths)
    hashes = np.zeros((n, s.hash_block ** 2 // 64), np.uint64)
    mirrors = np.zeros_like(hashes)
    thumbs = np.zeros((n, 8, 8, 3), np.uint8)
    for i, r in enumerate(hrec):
        if r["status"] == "ok":
            hashes[i] = np.frombuffer(bytes.fromhex(r["hash"]), np.uint64)
            mirrors[i] = np.frombuffer(bytes.fromhex(r["mirror"]), np.uint64)
            thumbs[i] = np.frombuffer(bytes.fromhex(r["thumb"]), np.uint8).reshape(8, 8, 3)
    desc, source, detector = None, [""] * n, [""] * n
    if s.faces:
        desc = np.full((n, 128), np.nan, np.float32)
        for i, r in enumerate(frec):
            if r["status"] == "ok":
                v = np.asarray(r["descriptor"], np.float32)
                desc[i] = (v + np.asarray(r["mirrored"], np.float32)) / 2 if s.flip_average else v
                source[i], detector[i] = r.get("source", ""), r.get("detector", "")
    return Signatures([r["status"] for r in hrec], hashes, mirrors, desc, source, detector, n - len(items),
                      len(items), time.perf_counter() - t0, thumbs, fp)
