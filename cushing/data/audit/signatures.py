"""Every photo's signatures (hashes, thumbnail, face descriptors), computed once on a process pool (dlib per
process) and cached per photo content (sha256 of the bytes) in small JSON files written atomically, so a rerun
over the same cohort decodes nothing."""
from __future__ import annotations

import dataclasses
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


def _lookup(cache: SignatureCache, shas, s: AuditSettings, memo: Path) -> tuple[list, list, list, list, Any]:
    """Cache keys and hits for every photo; None keys for photos whose bytes could not be read."""
    hp = {"v": HASH_VERSION, "size": s.hash_image, "block": s.hash_block, "max_side": s.max_side}
    fp = {"v": FACE_VERSION, **_face_fingerprint(s, memo)} if s.faces else None
    hkeys = [cache.key("hash", sha, hp) if sha else None for sha in shas]
    fkeys = [cache.key("face", sha, fp) if sha and fp else None for sha in shas]
    hrec = [cache.get("hash", k) if k else None for k in hkeys]
    frec = [cache.get("face", k) if k else None for k in fkeys]
    return hkeys, fkeys, hrec, frec, fp


def photo_signatures(paths: Sequence[str | Path], settings: AuditSettings = AuditSettings(), *,
                     shas: Sequence[str | None] | None = None, cache_dir: str | Path | None = None,
                     workers: int = 0, progress: bool = True) -> Signatures:
    """Hashes (and descriptors when settings.faces) for each photo, from the cache or computed on a pool."""
    t0 = time.perf_counter()
    paths = [str(p) for p in paths]
    shas = list(shas) if shas is not None else _photo_shas(paths)
    cache = SignatureCache(cache_dir or _default_cache())
    hkeys, fkeys, hrec, frec, fp = _lookup(cache, shas, settings, cache.root / "weights_hashes.json")
    items = [(i, p, hrec[i] is None, settings.faces and frec[i] is None)
             for i, p in enumerate(paths) if shas[i] and (hrec[i] is None or (settings.faces and frec[i] is None))]
    with stops.cooperative():
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
    sig = _assemble(hrec, frec if settings.faces else None, settings, len(paths) - len(items), len(items),
                    time.perf_counter() - t0)
    return dataclasses.replace(sig, fingerprint=fp)


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
