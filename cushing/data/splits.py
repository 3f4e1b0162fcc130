"""Subject-grouped, label x sex stratified splits and folds. No subject is ever in two splits."""
from __future__ import annotations

import numpy as np
import pandas as pd

from cushing.data.manifest import SPLITS

__all__ = ["assign_splits", "assign_folds", "fold_split", "split_table", "check_no_leak", "claim_problems",
           "SplitError"]


class SplitError(ValueError):
    pass


def _units(table: pd.DataFrame, strata: tuple[str, ...] = ("label", "sex"),
           groups: pd.Series | None = None) -> pd.DataFrame:
    """One row per unit that must stay whole (a subject, or a group of subjects the cohort audit found to be one
    person) with its stratum: label (1 if any image is positive) x the other strata columns (first value)."""
    key = (groups if groups is not None else table["subject_id"]).rename("unit")
    g = table.groupby(key, sort=True)
    units = pd.DataFrame({"label": g["label"].max(), "n": g.size()})
    others = [g[col].first().astype(str) for col in strata if col != "label"]
    prefix = others[0].str.cat(others[1:], sep="|") if others else pd.Series("", index=units.index)
    units["stratum"] = prefix + units["label"].astype(str)  # "F0", "F1", ... as before for label x sex
    return units


def _shuffled(units: pd.DataFrame, seed: int):
    """Each stratum's unit ids, strata in sorted order, each shuffled in turn by one generator seeded `seed`."""
    rng = np.random.default_rng(seed)
    for stratum in sorted(units["stratum"].unique()):
        ids = units.index[units["stratum"] == stratum].to_numpy()
        yield ids[rng.permutation(len(ids))]


def _allocate(n: int, ratios: tuple[float, ...]) -> list[int]:
    """Largest-remainder allocation of n items to parts with the given ratios (exact total)."""
    raw = np.asarray(ratios, float) / float(sum(ratios)) * n
    counts = np.floor(raw).astype(int)
    counts[np.argsort(-(raw - counts), kind="stable")[: n - counts.sum()]] += 1
    return counts.tolist()


def assign_splits(table: pd.DataFrame, ratios: tuple[float, float, float] = (1, 1, 1), seed: int = 0, *,
                  strata: tuple[str, ...] = ("label", "sex"), groups: pd.Series | None = None) -> pd.Series:
    """Split per image, honouring a filled `split` column (checked for leakage) or drawing one: whole subjects
    (or whole `groups`, e.g. ids the cohort audit merged as one person), stratified on `strata`."""
    if "split" in table.columns:
        check_no_leak(table, table["split"])
        return table["split"].copy()
    where: dict[str, str] = {}
    for ids in _shuffled(_units(table, strata, groups), seed):
        bounds = np.cumsum([0, *_allocate(len(ids), ratios)])
        where.update({s: split for split, a, b in zip(SPLITS, bounds, bounds[1:]) for s in ids[a:b]})
    out = (groups if groups is not None else table["subject_id"]).map(where)
    check_no_leak(table, out)
    return out.rename("split")


def assign_folds(table: pd.DataFrame, k: int, seed: int = 0, *, strata: tuple[str, ...] = ("label", "sex"),
                 groups: pd.Series | None = None) -> pd.Series:
    """Stratified group k-fold: fold index per image; subjects (or whole `groups`, e.g. ids the cohort audit
    merged as one person) stay whole, `strata` balanced across folds."""
    if k < 2:
        raise SplitError(f"cv_folds must be >= 2, got {k}")
    units = _units(table, strata, groups)
    if len(units) < k:
        raise SplitError(f"cv_folds={k} needs at least {k} subjects (or merged subject groups), got {len(units)}")
    fold_of: dict[str, int] = {}
    for ids in _shuffled(units, seed):  # each stratum starts where the last ended: small ones not all at fold 0
        fold_of.update({s: (j + len(fold_of)) % k for j, s in enumerate(ids)})
    key = groups if groups is not None else table["subject_id"]
    return key.map(fold_of).astype(int).rename("fold")


def fold_split(folds: pd.Series, i: int, k: int) -> pd.Series:
    """Fold i is the test fold, fold i+1 (mod k) validates, the rest train."""
    out = np.where(folds == i, "test", np.where(folds == (i + 1) % k, "val", "train"))
    return pd.Series(out, index=folds.index, name="split")


def claim_problems(table: pd.DataFrame, splits: dict[str, pd.Series], *, min_positives: int,
                   subgroups: tuple[str, ...], allow_few: bool, allow_one_class: bool) -> list[str]:
    """What no claim can be made on, one line per kind with its numbers: a split (of each named split, e.g. a
    CV fold's) without patients or without controls; with fewer patients than min_positives; a sex or subgroup
    of val or test without one of the classes. The two last are refused unless allowed. Patients and controls are
    people (subject ids), however many photos each has."""
    if table["label"].nunique() < 2:
        pos, neg = _people(table)
        return [f"the cohort has {pos} patients and {neg} controls: a screening model needs both"]
    one, few, thin = [], [], []
    for where, split in splits.items():
        for name in SPLITS:
            part = table[(split == name).to_numpy()]
            pos, neg = _people(part)
            if part.empty and name == "test":  # split_ratios may leave out a test split; never train or val
                continue
            if 0 in (pos, neg):
                one.append(f"{where}{name} {pos} patients, {neg} controls")
                continue
            few += [f"{where}{name} {pos}"] if pos < min_positives else []
            for col in subgroups if name != "train" else ():
                thin += [f"{where}{name} {col}={v}: {p} patients, {n} controls"
                         for v, (p, n) in ((v, _people(g)) for v, g in part.groupby(part[col].astype(str)))
                         if 0 in (p, n)]
    out = [f"a split without patients or without controls ({'; '.join(one)}): nothing can be estimated on one "
           "class; add photos, or change split_ratios or the manifest's split column"] if one else []
    if few and not allow_few:
        out.append(f"fewer patients than min_positives={min_positives} ({', '.join(few)}): too few for its metrics "
                   "to mean much (--allow-few-positives true trains anyway)")
    if thin and not allow_one_class:
        out.append(f"a subgroup without one of the classes ({'; '.join(thin)}): its metrics cannot be estimated "
                   f"(--allow-one-class-subgroups true trains anyway)")
    return out


def _people(part: pd.DataFrame) -> tuple[int, int]:
    """Patients and controls: distinct subject ids with label 1 and with label 0."""
    return tuple(int(part.loc[part["label"] == k, "subject_id"].nunique()) for k in (1, 0))  # type: ignore[return-value]


def check_no_leak(table: pd.DataFrame, split: pd.Series) -> None:
    if bad := set(split.dropna().unique()) - set(SPLITS):
        raise SplitError(f"unknown split value(s): {sorted(bad)}")
    per_subject = pd.DataFrame({"s": table["subject_id"], "split": split}).groupby("s")["split"].nunique()
    if len(leaked := per_subject[per_subject > 1]):
        raise SplitError(f"{len(leaked)} subject(s) appear in more than one split, e.g. {list(leaked.index[:3])}")
    for need in ("train", "val"):
        if not (split == need).any():
            raise SplitError(f"the {need} split is empty")


def split_table(table: pd.DataFrame, split: pd.Series) -> pd.DataFrame:
    """The paper's Table I: images and subjects per split x sex x label."""
    df = pd.DataFrame({"split": split, "sex": table["sex"], "label": table["label"], "s": table["subject_id"]})
    out = df.groupby(["split", "sex", "label"]).agg(images=("s", "size"), subjects=("s", "nunique")).reset_index()
    out["split"] = pd.Categorical(out["split"], SPLITS, ordered=True)
    return out.sort_values(["split", "sex", "label"]).reset_index(drop=True)
