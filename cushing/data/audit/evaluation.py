"""The evidence behind the audit's thresholds, on real identities (CelebA): precision and recall of "same person"
with Wilson intervals, overall and by sex, and the curve the automatic threshold reads; false duplicate pairs among
strangers and how far re-saved copies (made in memory, never written) drift."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from cushing.data.audit.curvefile import curve_counts, curve_table, rate
from cushing.data.audit.hashing import _hamming_block, color_distance, color_thumbnail, perceptual_hash
from cushing.data.audit.settings import AuditSettings
from cushing.data.audit.signatures import _decode, photo_signatures

__all__ = ["SamePersonEvaluation", "evaluate_same_person", "evaluate_duplicates"]


def _read_celeba(manifest_csv: str | Path) -> pd.DataFrame:
    path = Path(manifest_csv)
    df = pd.read_csv(path, dtype=str, keep_default_na=False)
    df["path"] = [str(p if Path(p).is_absolute() else path.parent / p) for p in df["image"]]
    return df[["path", "subject_id", "sex"]]


def _sample(df: pd.DataFrame, n_photos: int, seed: int, multi_share: float = 0.8) -> pd.DataFrame:
    """Whole identities with >= 2 photos up to multi_share of n (the same-person pairs), then single photos
    of other identities (strangers only) to fill up. n_photos <= 0: every photo."""
    if n_photos <= 0 or n_photos >= len(df):
        return df.reset_index(drop=True)
    counts = df["subject_id"].value_counts()
    multi = counts[counts >= 2].index.to_numpy()
    np.random.default_rng(seed).shuffle(multi)
    take, n = [], 0
    for s in multi:
        if n + counts[s] <= multi_share * n_photos:
            take.append(s)
            n += counts[s]
    chosen = df[df["subject_id"].isin(take)]
    rest = df[~df["subject_id"].isin(take)].drop_duplicates("subject_id")
    fill = rest.sample(min(len(rest), max(0, n_photos - len(chosen))), random_state=seed)
    return pd.concat([chosen, fill], ignore_index=True)


def _threshold_rows(d: np.ndarray, same: np.ndarray, group: str, thresholds: Sequence[float]) -> list[dict]:
    pos, neg = np.sort(d[same]), np.sort(d[~same])
    rows = []
    for t in thresholds:
        tp, fp = (int(np.searchsorted(v, t, side="left")) for v in (pos, neg))
        (p, plo, phi), (r, rlo, rhi), (f, flo, fhi) = rate(tp, tp + fp), rate(tp, len(pos)), rate(fp, len(neg))
        rows.append({"threshold": float(t), "group": group, "pos_pairs": len(pos), "neg_pairs": len(neg), "tp": tp,
                     "fp": fp, "precision": p, "precision_lo": plo, "precision_hi": phi, "recall": r, "recall_lo": rlo,
                     "recall_hi": rhi, "false_match_rate": f, "fmr_lo": flo, "fmr_hi": fhi,
                     "false_pairs_per_343": f * 343 * 342 / 2})
    return rows


@dataclass(frozen=True)
class SamePersonEvaluation:
    table: pd.DataFrame  # threshold x group (all, F, M, both_detected): precision, recall, false-match rate
    photos: int
    identities: int
    detected_rate: float  # share of readable photos whose descriptor came from a detected face
    detector_counts: dict[str, int]
    seconds: float
    curve: pd.DataFrame | None = None  # the same-person curve (`curvefile`): pair counts and rates by sex per t
    fingerprint: dict[str, Any] | None = None  # what the descriptors depended on (written into the curve file)


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
    both = {"F": (sex, "F"), "M": (sex, "M"), "both_detected": (src, "detected")}
    masks = {"all": np.ones_like(same), **{g: (v[iu] == w) & (v[ju] == w) for g, (v, w) in both.items()}}
    rows = [r for g, m in masks.items() for r in _threshold_rows(d[m], same[m], g, thresholds)]
    det = pd.Series(sig.detector)[keep].replace("", "whole_image").value_counts().to_dict()
    majority = df["subject_id"].map(df.groupby("subject_id")["sex"].agg(lambda v: v.mode().iat[0]))
    curve = curve_table(curve_counts(x, subj, majority.to_numpy()))
    return SamePersonEvaluation(pd.DataFrame(rows), len(df), df["subject_id"].nunique(),
                                float((src == "detected").mean()), {str(k): int(v) for k, v in det.items()},
                                sig.seconds, curve, sig.fingerprint)


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


def _copy_distances(paths: Sequence[str], hashes: np.ndarray, mirrors: np.ndarray, s: AuditSettings) -> pd.DataFrame:
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
    strangers, same = np.zeros(bits + 1, np.int64), np.zeros(bits + 1, np.int64)
    cols = np.arange(len(hashes))
    for s in range(0, len(hashes), block_rows):
        rows = cols[s:s + block_rows]
        d = _hamming_block(hashes[rows], hashes)
        if mirrors is not None:
            d = np.minimum(d, np.minimum(_hamming_block(hashes[rows], mirrors), _hamming_block(mirrors[rows], hashes)))
        upper, one = cols[None, :] > rows[:, None], codes[rows][:, None] == codes[None, :]
        strangers += np.bincount(d[upper & ~one], minlength=bits + 1)
        same += np.bincount(d[upper & one], minlength=bits + 1)
    return strangers, same


def evaluate_duplicates(manifest_csv: str | Path, *, n_photos: int | None = 300, n_copies: int = 100, seed: int = 0,
                        settings: AuditSettings = AuditSettings(), cache_dir: str | Path | None = None,
                        workers: int = 0, progress: bool = True) -> dict[str, Any]:
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
            "false_pairs": fp, "false_pair_rate": rate(fp, int(strangers.sum())),
            "min_stranger_bits": int(nz[0]) if len(nz) else None,
            "stranger_bits_quantiles": {q: int(np.searchsorted(np.cumsum(strangers), q * strangers.sum()))
                                        for q in (1e-6, 1e-5, 1e-4, 1e-3, 0.5)},
            "same_identity_pairs_flagged": int(same[:s.duplicate_max_bits + 1].sum()),
            "copies": copies.groupby("variant")[["bits", "color"]].agg(["max", "mean"]).reset_index(),
            "copies_found": float(((copies["bits"] <= s.duplicate_max_bits)
                                   & (copies["color"] <= s.duplicate_max_color)).mean()), "seconds": sig.seconds}
