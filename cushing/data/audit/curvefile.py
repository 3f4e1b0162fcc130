"""The same-person curve on a labelled cohort (`cushing audit --evaluate`): per grid distance, how many pairs of
different people (by sex of the pair) and of one person come closer, with Wilson intervals, in the format of the
shipped `same_person_curve.csv` (a site audits with its own: `audit_curve`). Counts are kept beside the rates so
intervals can be recomputed and curves of several cohorts merged by summing. Pairs are counted in row blocks."""
from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cushing.data.audit.descriptors import CURVE_MODELS, LANDMARKS
from cushing.data.audit.threshold import CURVE_FORMAT
from cushing.stats.intervals import wilson

__all__ = ["GRID", "curve_counts", "curve_table", "write_curve", "rate"]

GRID = np.round(np.arange(0.300, 0.6501, 0.005), 3)
_NEG = ("all", "F", "M", "mixed")
_POS = ("all", "F", "M")


def _pair_groups(sx_i: np.ndarray, sx_j: np.ndarray) -> dict[str, np.ndarray]:
    f, m = (sx_i == "F") & (sx_j == "F"), (sx_i == "M") & (sx_j == "M")
    mixed = ((sx_i == "F") & (sx_j == "M")) | ((sx_i == "M") & (sx_j == "F"))
    return {"all": np.ones_like(f), "F": f, "M": m, "mixed": mixed}


def curve_counts(x: np.ndarray, subjects: np.ndarray, sex: np.ndarray, grid: np.ndarray = GRID,
                 block_rows: int = 512) -> dict[str, np.ndarray]:
    """Pair totals and, per grid distance t, pairs with distance < t: `neg_*`/`false_*` for pairs of different
    subjects, `pos_*`/`true_*` for pairs of one subject, by sex of the pair (each photo's subject's sex)."""
    x = np.asarray(x, dtype=np.float64)
    codes = pd.factorize(pd.Series(np.asarray(subjects, dtype=object)))[0]
    sex = np.asarray(sex, dtype=object)
    sq = (x * x).sum(axis=1)
    out = {f"{k}_{g}": np.zeros(len(grid), np.int64) for k in ("false", "true") for g in _NEG}
    out.update({f"{k}_{g}": 0 for k in ("neg", "pos") for g in _NEG})
    for s in range(0, len(x), block_rows):
        rows = np.arange(s, min(s + block_rows, len(x)))
        d = np.sqrt(np.maximum(sq[rows, None] + sq[None, :] - 2.0 * (x[rows] @ x.T), 0.0))
        ii, jj = np.nonzero(np.arange(len(x))[None, :] > rows[:, None])
        ii = rows[ii]
        dist = d[ii - s, jj]
        same = codes[ii] == codes[jj]
        for g, mask in _pair_groups(sex[ii], sex[jj]).items():
            for kind, sel in (("false", mask & ~same), ("true", mask & same)):
                v = np.sort(dist[sel])
                out[f"{kind}_{g}"] += np.searchsorted(v, grid, side="left")  # strict: distance < t
                out[f"{'neg' if kind == 'false' else 'pos'}_{g}"] += len(v)
    return out


def rate(k: int, n: int) -> tuple[float, float, float]:
    """(k / n, Wilson 95% low, high); NaN when n is 0."""
    return (k / n if n else float("nan")), *wilson(int(k), int(n))


def _rates(k: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return tuple(np.array(v, dtype=float) for v in zip(*(rate(v, n) for v in k)))  # type: ignore[return-value]


def curve_table(counts: dict[str, Any], grid: np.ndarray = GRID) -> pd.DataFrame:
    """The curve's columns, in the shipped file's order."""
    cols: dict[str, Any] = {"distance": grid}
    for total, k, groups, names in (("neg", "false", _NEG, ("false_pair_rate", "fpr_lo", "fpr_hi")),
                                    ("pos", "true", _POS, ("recall", "recall_lo", "recall_hi"))):
        for g in groups:
            cols.update({f"{total}_pairs_{g}": counts[f"{total}_{g}"], f"{k}_pairs_{g}": counts[f"{k}_{g}"],
                         **dict(zip((f"{n}_{g}" for n in names), _rates(counts[f"{k}_{g}"], counts[f"{total}_{g}"])))})
    return pd.DataFrame(cols)


def write_curve(table: pd.DataFrame, path: str | Path, *, fingerprint: dict[str, Any], cohort: str,
                manifest_sha256: str, photos: int, identities: int, flip_average: bool, command: str) -> Path:
    """The curve file: `# key: value` lines (what it was measured with and on), then the table."""
    weights = fingerprint.get("weights", {})
    meta = {"format": CURVE_FORMAT,
            "descriptor": "dlib_face_recognition_resnet_model_v1, 150 px chip, padding 0.25, num_jitters 0",
            "landmarks": LANDMARKS.removesuffix(".dat"), "flip_average": str(flip_average).lower(),
            "detection": "hog upsample 0..2 (bounded by max_side 800), mmod cnn fallback (upsample 0..1), "
                         "whole image last",
            "distance": "euclidean between descriptors; a pair counts when distance < t (strict)",
            "dlib": fingerprint.get("dlib", "unknown"),
            **{key: weights.get(name, "") for key, name in CURVE_MODELS.items()},
            "sha256_cnn_detector": weights.get("mmod_human_face_detector.dat", ""),
            "cohort": cohort, "cohort_manifest_sha256": manifest_sha256, "photos": str(photos),
            "identities": str(identities),
            "sex": "per identity, its most frequent value; F = both photos F, M = both M, mixed = one of each",
            "intervals": "Wilson 95%", "grid": f"{table['distance'].min():.3f}..{table['distance'].max():.3f} step "
                                               f"{np.diff(table['distance'].to_numpy()).min():.3f}",
            "measured": dt.date.today().isoformat(), "command": command}
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with open(p, "w") as f:
        f.writelines(f"# {k}: {v}\n" for k, v in meta.items())
        table.to_csv(f, index=False, float_format="%.6g")
    return p
