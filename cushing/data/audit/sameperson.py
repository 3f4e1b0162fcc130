"""Same-person pairs and what happens to each: the strict distance (merged), the threshold (automatic or fixed) with
the mutual-nearest filter (kept in one split as a precaution), the guard on group size, a person's verdicts; every
pair below the threshold is listed, with the nearest misses."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from cushing.data.audit.descriptors import CURVE_MODELS, descriptor_pairs
from cushing.data.audit.settings import AuditSettings
from cushing.data.audit.threshold import Curve, curve_threshold, expected_at, guarded_threshold, mutual_pairs, \
    nearest_strangers, pair_counts, read_curve, strict_distance

__all__ = ["ThresholdChoice", "same_person_pairs", "check_curve"]

# the radius searched beyond the threshold for the nearest misses (per-pair recall rises ~0.08 over 0.025)
NEAR_MARGIN = 0.05


@dataclass(frozen=True)
class ThresholdChoice:
    threshold: float  # pairs closer than this are candidates (kept together when mutual, else review)
    strict: float  # pairs closer than this are merged as one person (0: none, e.g. without a curve)
    expected_false_merges: float  # E at the strict distance: near zero
    auto: bool  # chosen by the rule (else the number given)
    threshold_curve: float  # the rule's threshold before the guard (NaN when fixed)
    guard_bound: bool  # the guard lowered it to keep groups small
    expected_false_pairs: float  # E at the threshold from the curve (NaN when no usable curve)
    photos: int  # photos with a descriptor
    group_limit: int  # the guard's bound on a merged group, in photos
    curve: str  # the curve's file name
    curve_sha256: str


def check_curve(curve: Curve, fingerprint: dict[str, Any] | None, flip_average: bool) -> list[str]:
    """What differs between how the curve was measured and how this audit describes faces (empty: it applies)."""
    weights = (fingerprint or {}).get("weights", {})
    problems = [f"{key} {curve.meta.get(key, '?')[:12]}... vs {weights[name][:12]}... ({name})"
                for key, name in CURVE_MODELS.items() if name in weights and curve.meta.get(key) != weights[name]]
    if curve.meta.get("flip_average", "true") != str(flip_average).lower():
        problems.append(f"flip_average {curve.meta.get('flip_average')} vs {str(flip_average).lower()}")
    return problems


def _curve_for(s: AuditSettings, fingerprint: dict | None) -> Curve | None:
    """The curve, refused (auto) or ignored (a fixed threshold: E is then not reported) when it does not apply."""
    try:
        curve = read_curve(s.curve)
    except (OSError, ValueError):
        if s.same_person_max_distance is None or s.curve:
            raise
        return None
    if problems := check_curve(curve, fingerprint, s.flip_average):
        if s.same_person_max_distance is None:
            raise ValueError(f"{curve.path}: this same-person curve was measured with other settings or weights "
                             f"({'; '.join(problems)}); regenerate it with `cushing audit --evaluate` or give a "
                             f"fixed audit_threshold")
        return None
    return curve


def _with_verdicts(df: pd.DataFrame, desc: np.ndarray, codes: np.ndarray,
                   verdicts: dict[tuple[int, int], str]) -> pd.DataFrame:
    """Each row's verdict, plus the pairs marked `same` that the search did not reach (any distance)."""
    have = set(zip(df["i"].tolist(), df["j"].tolist()))
    df = df.assign(verdict=[verdicts.get((a + 2, b + 2), "") for a, b in zip(df["i"], df["j"])])
    extra = [(a - 2, b - 2) for (a, b), v in verdicts.items()
             if v == "same" and (a - 2, b - 2) not in have and codes[a - 2] != codes[b - 2]]
    if not extra:
        return df
    a, b = np.array(extra).T
    d = np.linalg.norm(desc[a].astype(np.float64) - desc[b].astype(np.float64), axis=1)
    return pd.concat([df, pd.DataFrame({"i": a, "j": b, "distance": d, "mutual": False, "verdict": "same"})],
                     ignore_index=True)


def _decide(df: pd.DataFrame, t: float, strict: float, near: int) -> pd.DataFrame:
    """merged (below the strict distance), precaution (below t, mutual), review (below t), below_threshold (the
    `near` closest at or above t, and any reviewed pair); other pairs are dropped."""
    df = df.sort_values(["distance", "i", "j"], ignore_index=True, na_position="last")
    d = df["distance"].to_numpy()
    below = d < t
    df["decision"] = np.select([d < strict, below & df["mutual"].to_numpy(), below],
                               ["merged", "precaution", "review"], "below_threshold")
    misses = np.cumsum(~below) <= near
    return df[below | misses | (df["verdict"] != "")].reset_index(drop=True)


def same_person_pairs(desc: np.ndarray, subject_ids: np.ndarray, sex: np.ndarray, s: AuditSettings, *,
                      fingerprint: dict | None = None, verdicts: dict[tuple[int, int], str] | None = None,
                      forced: list[tuple[int, int]] = ()) -> tuple[pd.DataFrame, ThresholdChoice]:
    """Rows (i, j, distance, mutual, verdict, decision) for pairs of different subjects, and how the threshold was
    chosen. `forced` are row pairs merged anyway (duplicate photos), which the guard counts in its groups."""
    verdicts = verdicts or {}
    codes = pd.factorize(pd.Series(np.asarray(subject_ids, dtype=object)))[0]
    valid = np.isfinite(desc).all(axis=1)
    n = int(valid.sum())
    counts = pair_counts(np.asarray(sex, dtype=object)[valid], codes[valid])
    curve = _curve_for(s, fingerprint)
    if s.same_person_max_distance is None:  # the threshold to search with, the rule's before the guard, E at it
        t, e = curve_threshold(curve, counts, n, s.false_pairs_per_photo)
        t_curve = t
    else:
        t, t_curve = s.same_person_max_distance, float("nan")
        e = expected_at(curve, counts, t) if curve is not None else float("nan")
    strict = strict_distance(curve, counts, s.certain_false_pairs) if curve else 0.0
    i, j, d = descriptor_pairs(desc, t + NEAR_MARGIN, groups=codes)
    mutual = mutual_pairs(i, j, nearest_strangers(desc, codes, s.mutual_k))
    df = _with_verdicts(pd.DataFrame({"i": i, "j": j, "distance": d, "mutual": mutual}), desc, codes, verdicts)
    limit = max(int(np.floor(s.max_group_share * n)), 3)
    if s.same_person_max_distance is None:
        kept = df["mutual"] | (df["distance"] < strict)
        edges = df[(df["distance"] < t) & kept & (df["verdict"] != "different")]
        forced_codes = [(codes[a], codes[b]) for a, b in forced if verdicts.get((a + 2, b + 2)) != "different"]
        forced_codes += [(codes[a - 2], codes[b - 2]) for (a, b), v in verdicts.items() if v == "same"]
        edges = pd.DataFrame({"a": codes[edges["i"]], "b": codes[edges["j"]], "distance": edges["distance"]})
        t, _ = guarded_threshold(edges, np.bincount(codes, minlength=codes.max(initial=-1) + 1), curve.grid, t, limit,
                                 forced_codes)
        e = expected_at(curve, counts, t)
    strict = min(strict, t)  # never past the threshold: a fixed one, or one the guard lowered
    e_strict = expected_at(curve, counts, strict) if strict else 0.0
    choice = ThresholdChoice(t, strict, e_strict, s.same_person_max_distance is None, t_curve, bool(t < t_curve), e,
                             n, limit, curve.path.name if curve else "", curve.sha256 if curve else "")
    return _decide(df, t, strict, s.near_misses), choice

