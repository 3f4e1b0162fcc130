"""The automatic same-person threshold: what a merge costs in this cohort, from a measured false-pair curve.

    E(t)    = rate_FF(t) C(n_F, 2) + rate_MM(t) C(n_M, 2) + rate_mixed(t) n_F n_M (+ rate_all(t) x pairs with a
              photo of unknown sex), over pairs of photos under different subject ids
    t_curve = the loosest grid distance with E(t) <= false_pairs_per_photo x photos
    t_strict = the loosest grid distance with E(t) <= certain_false_pairs (0.05) in the whole cohort
    merged  = pairs below t_strict: one person, as near certain as the curve can say
    kept    = pairs below t that are mutual k-nearest neighbours (each among the other's k closest photos of other
              subjects): kept in one split as a precaution; the other pairs below t go to review
    guard   = t lowered until no kept group of >= 3 subject ids holds > max(floor(share x photos), 3) photos

Why these: false pairs pile onto a few "hub" faces, which would chain strangers into one group if every pair
below t merged; a hub can merge with its k mutual neighbours only. The measurements are in
docs/explanation/cohort-audit.md. The curve (`same_person_curve.csv`, shipped next to this module) has per-sex
false-pair rates on a 0.30..0.65 grid; `cushing audit --evaluate` writes one for a site's own labelled photos.
"""
from __future__ import annotations

import hashlib
import io
import itertools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

__all__ = ["Curve", "read_curve", "SHIPPED_CURVE", "pair_counts", "expected_false_pairs", "curve_threshold",
           "strict_distance", "nearest_strangers", "mutual_pairs", "guarded_threshold", "CURVE_FORMAT"]

SHIPPED_CURVE = Path(__file__).with_name("same_person_curve.csv")
CURVE_FORMAT = "cushing same-person curve v1"
SEX_GROUPS = ("F", "M", "mixed")
_NEEDED = ["distance", "false_pair_rate_all", *(f"false_pair_rate_{g}" for g in SEX_GROUPS)]


@dataclass(frozen=True)
class Curve:
    table: pd.DataFrame  # one row per grid distance: counts, rates and Wilson intervals by sex of the pair
    meta: dict[str, str]  # the `# key: value` header: what it was measured with and on
    path: Path
    sha256: str  # of the file's bytes: logged with the audit

    @property
    def grid(self) -> np.ndarray:
        return self.table["distance"].to_numpy(dtype=float)

    def rates(self, group: str) -> np.ndarray:
        return self.table[f"false_pair_rate_{group}"].to_numpy(dtype=float)


def read_curve(path: str | Path | None = None) -> Curve:
    """The shipped curve, or a site's (`cushing audit --evaluate`); errors name the file and what is wrong."""
    p = Path(path) if path else SHIPPED_CURVE
    if not p.is_file():
        raise FileNotFoundError(f"same-person curve {p} not found (write one with `cushing audit --evaluate`)")
    data = p.read_bytes()
    text = data.decode("utf-8", errors="replace")
    head = itertools.takewhile(lambda line: line.startswith("#"), text.splitlines())
    meta = {k.strip(): v.strip() for k, _, v in (line[1:].strip().partition(":") for line in head)}
    if meta.get("format") != CURVE_FORMAT:
        raise ValueError(f"{p}: not a same-person curve (its first lines must say `# format: {CURVE_FORMAT}`)")
    table = pd.read_csv(io.StringIO(text), comment="#")
    if missing := [c for c in _NEEDED if c not in table.columns]:
        raise ValueError(f"{p}: missing column(s) {', '.join(missing)}")
    d = table["distance"].to_numpy(dtype=float)
    if len(d) < 2 or not (np.diff(d) > 0).all():
        raise ValueError(f"{p}: the distance column must increase down the rows")
    return Curve(table, meta, p, hashlib.sha256(data).hexdigest())


def pair_counts(sex: np.ndarray, subjects: np.ndarray) -> dict[str, int]:
    """Photo pairs by sex of the pair (F, M, mixed, unknown), without the pairs of one subject's own photos:
    those are never candidates. `sex` per photo (F, M or anything else = unknown)."""
    sex = np.asarray(sex, dtype=object)
    f, m = sex == "F", sex == "M"
    frame = pd.DataFrame({"f": f, "m": m, "u": ~(f | m)}, dtype=np.int64)

    def pairs(f, m, u):  # photo counts -> pair counts (ints for the cohort, arrays per subject)
        return {"F": f * (f - 1) // 2, "M": m * (m - 1) // 2, "mixed": f * m, "unknown": u * (u - 1) // 2 + u * (f + m)}
    every = pairs(*frame.sum())
    own = pairs(*(v.to_numpy() for _, v in frame.groupby(np.asarray(subjects, dtype=object)).sum().items()))
    return {k: int(every[k] - own[k].sum()) for k in every}


def expected_false_pairs(curve: Curve, counts: dict[str, int]) -> np.ndarray:
    """E(t) at every grid distance of the curve."""
    return sum(curve.rates(g) * counts[g] for g in SEX_GROUPS) + curve.rates("all") * counts["unknown"]


def expected_at(curve: Curve, counts: dict[str, int], t: float) -> float:
    """E at any distance (a fixed threshold), linear between grid points, clamped to the grid's ends."""
    return float(np.interp(t, curve.grid, expected_false_pairs(curve, counts)))


def curve_threshold(curve: Curve, counts: dict[str, int], n_photos: int, bound: float) -> tuple[float, float]:
    """(t_curve, E(t_curve)): the loosest grid distance whose expected false pairs stay <= bound x photos; the
    grid's first distance when even that expects more (a very large cohort: the audit then says so)."""
    e = expected_false_pairs(curve, counts)
    i = int(np.flatnonzero(e <= bound * n_photos).max(initial=0))
    return float(curve.grid[i]), float(e[i])


def strict_distance(curve: Curve, counts: dict[str, int], bound: float) -> float:
    """The loosest grid distance whose expected false pairs in the whole cohort stay <= bound; 0 when even the
    grid's first distance expects more (a large cohort: then only duplicate photos are merged)."""
    ok = np.flatnonzero(expected_false_pairs(curve, counts) <= bound)
    return float(curve.grid[ok.max()]) if len(ok) else 0.0


def nearest_strangers(x: np.ndarray, codes: np.ndarray, k: int, block_rows: int = 512) -> np.ndarray:
    """[n, k] row indices of each photo's k nearest photos of other subjects (-1 where fewer exist or the row has
    no descriptor), in blocks of rows so memory stays O(block x n)."""
    x = np.asarray(x, dtype=np.float64)
    valid = np.isfinite(x).all(axis=1)
    xv = np.where(valid[:, None], x, 0.0)
    sq = (xv * xv).sum(axis=1)
    out = np.full((len(x), k), -1, dtype=np.int64)
    for s in range(0, len(x), block_rows):
        d2 = sq[s:s + block_rows, None] + sq[None, :] - 2.0 * (xv[s:s + block_rows] @ xv.T)
        d2[(codes[s:s + block_rows, None] == codes[None, :]) | ~valid[None, :] | ~valid[s:s + block_rows, None]] \
            = np.inf
        kk = min(k, d2.shape[1])
        near = np.argpartition(d2, kk - 1, axis=1)[:, :kk] if kk else np.zeros((len(d2), 0), np.int64)
        # the k smallest (O(n) per row, not a full sort), then in order of distance, ties by index
        order = np.take_along_axis(near, np.lexsort((near, np.take_along_axis(d2, near, axis=1)), axis=1), axis=1)
        ok = np.isfinite(np.take_along_axis(d2, order, axis=1))
        out[s:s + block_rows, :order.shape[1]] = np.where(ok, order, -1)
    return out


def mutual_pairs(i: np.ndarray, j: np.ndarray, nn: np.ndarray) -> np.ndarray:
    """Whether each pair (i, j) is mutual: j among i's nearest strangers and i among j's."""
    i, j = np.asarray(i, dtype=np.int64), np.asarray(j, dtype=np.int64)
    return (nn[i] == j[:, None]).any(axis=1) & (nn[j] == i[:, None]).any(axis=1)


def guarded_threshold(edges: pd.DataFrame, photos_per_subject: np.ndarray, grid: np.ndarray, t_curve: float,
                      limit: int, forced: list[tuple[int, int]] = ()) -> tuple[float, int]:
    """(t, largest merged group in photos at t): union-find over subjects, from the `forced` merges (duplicate
    photos, pairs marked same), along the merging `edges` (a, b = subject codes, distance < t_curve) closest first.
    The first edge that would make a group of >= 3 subjects hold more than `limit` photos sets t to the loosest
    grid distance that excludes it. Two subjects alone are never a chain of strangers: one person under two ids
    may merge even when their photos together pass the limit."""
    parent = np.arange(len(photos_per_subject))
    size = np.asarray(photos_per_subject, dtype=np.int64).copy()
    count = np.ones(len(parent), dtype=np.int64)

    def find(v: int) -> int:
        while parent[v] != v:
            parent[v] = parent[parent[v]]
            v = parent[v]
        return v

    def union(ra: int, rb: int) -> None:
        parent[rb] = ra
        size[ra] += size[rb]
        count[ra] += count[rb]

    for a, b in forced:
        if (ra := find(a)) != (rb := find(b)):
            union(ra, rb)
    biggest = int(size[count >= 2].max(initial=0))
    for e in edges.sort_values("distance", kind="stable").itertuples():
        if (ra := find(int(e.a))) == (rb := find(int(e.b))):
            continue
        if size[ra] + size[rb] > limit and count[ra] + count[rb] >= 3:
            below = grid[grid <= e.distance]
            return (float(below.max()) if len(below) else float(e.distance)), biggest
        union(ra, rb)
        biggest = max(biggest, int(size[ra]))
    return float(t_curve), biggest
