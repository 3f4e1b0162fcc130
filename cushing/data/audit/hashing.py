"""Duplicate photos: a 256-bit DCT perceptual hash compared by Hamming distance (also against each photo's mirror
image), confirmed by an 8x8 colour thumbnail."""
from __future__ import annotations

import numpy as np
import pandas as pd

__all__ = ["perceptual_hash", "color_thumbnail", "color_distance", "hamming_pairs", "duplicate_pairs"]


def perceptual_hash(rgb: np.ndarray, *, size: int = 64, block: int = 16, mirror: bool = False) -> np.ndarray:
    """DCT hash as uint64 words: survives re-encoding, resizing and format change because it keeps only the
    sign of the lowest frequencies relative to their median, which none of those operations move much."""
    from PIL import Image
    from scipy.fft import dctn

    gray = Image.fromarray(np.ascontiguousarray(rgb)).convert("L")
    g = np.asarray(gray.resize((size, size), Image.Resampling.BOX), dtype=np.float64)
    coeffs = dctn(g[:, ::-1] if mirror else g, type=2, norm="ortho")[:block, :block].ravel()
    return np.packbits(coeffs > np.median(coeffs)).view(">u8").astype(np.uint64)


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
    """(i, j, bits) with popcount(a[i] ^ b[j]) <= max_bits, in row blocks (10k photos: ~25 MB at a time). Without
    `b`, `a` against itself, i < j only; with `b`, every i != j (the mirror check: the two directions differ)."""
    a = np.ascontiguousarray(a, dtype=np.uint64)
    other = a if b is None else np.ascontiguousarray(b, dtype=np.uint64)
    found: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    for s in range(0, len(a), block_rows):
        start = s if b is None else 0  # self-comparison: the upper triangle is enough
        d = _hamming_block(a[s:s + block_rows], other[start:])
        ii, jj = np.nonzero(d <= max_bits)
        keep = jj + start > ii + s if b is None else jj != ii + s
        found.append((ii[keep] + s, jj[keep] + start, d[ii[keep], jj[keep]]))
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
    df = pd.concat(parts, ignore_index=True).sort_values(["i", "j", "d", "m"]).drop_duplicates(["i", "j"])
    out = pd.DataFrame({"i": idx[df["i"].to_numpy()], "j": idx[df["j"].to_numpy()],
                        "distance": df["d"].to_numpy(), "mirrored": df["m"].to_numpy(dtype=bool)})
    if thumbs is None or out.empty:
        return out
    color = [color_distance(thumbs[i], thumbs[j], m) for i, j, m in zip(out["i"], out["j"], out["mirrored"])]
    return out[np.asarray(color) <= max_color].reset_index(drop=True)
