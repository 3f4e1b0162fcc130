"""What a cohort must hold before anything trains: the manifest a `data` value names (the demo cohort made on
first use) and the claims its split can support. Cheap and torch-free, so that sweeps, tuning, pipelines and the
audit check a cohort before a study, a run or a model exists."""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Iterable

import pandas as pd

from cushing.config import ConfigError, TrainConfig, cache_home
from cushing.data.demo import make_demo_cohort
from cushing.data.manifest import Manifest, load_manifest
from cushing.data.splits import SplitError, assign_folds, assign_splits, claim_problems, fold_split
from cushing.stats.subgroups import check_subgroup_columns
from cushing.stats.thresholds import unattainable

__all__ = ["resolve_data", "check_cohort", "check_cohorts"]


def resolve_data(data: str) -> Path:
    """'demo' -> the demo cohort's manifest (made on first use, atomically); else the manifest path."""
    if data != "demo":
        return Path(data).expanduser()

    root = cache_home() / "demo-v1"
    manifest = root / "manifest.csv"
    if manifest.exists():
        return manifest
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="demo-", dir=root.parent))
    make_demo_cohort(tmp)
    try:
        tmp.rename(root)
    except OSError:  # another process made it first
        shutil.rmtree(tmp, ignore_errors=True)
    return manifest


def check_cohort(cfg: TrainConfig, manifest: Manifest, groups: pd.Series | None = None) -> None:
    """Refuse a cohort whose split (with cv_folds, every fold's) cannot support a claim (`claim_problems`),
    one line per problem with its numbers; cheap, so it runs before any photo is decoded or any run is made."""
    t = manifest.table
    check_subgroup_columns(t, tuple(c for c in (*cfg.subgroup_columns, *cfg.strata_columns) if c != "label"))
    if cfg.cv_folds > 1:
        folds = assign_folds(t, cfg.cv_folds, seed=cfg.split_seed, strata=cfg.strata_columns, groups=groups)
        splits = {f"fold {i} ": fold_split(folds, i, cfg.cv_folds) for i in range(cfg.cv_folds)}
    else:
        splits = {"": assign_splits(t, cfg.ratios, seed=cfg.split_seed, strata=cfg.strata_columns, groups=groups)}
    problems = claim_problems(t, splits, min_positives=cfg.min_positives, subgroups=cfg.subgroup_columns,
                              allow_few=cfg.allow_few_positives, allow_one_class=cfg.allow_one_class_subgroups)
    if problems:
        raise SplitError("\n".join(f"{manifest.source}: {p}" for p in problems))
    for name, split in splits.items():  # a guaranteed threshold (sensitivity_lcb:X) this validation split can't give
        val = t[(split == "val").to_numpy()].groupby("subject_id")["label"].max()
        why = unattainable(cfg.threshold, int(val.sum()), int(len(val) - val.sum()))
        if why:
            raise ConfigError(name + why)


def check_cohorts(configs: Iterable[TrainConfig]) -> None:
    """`check_cohort` for every configuration (each manifest read once): what a sweep or a tuning checks before its
    study or any run exists."""
    read: dict[tuple, Manifest] = {}
    for cfg in configs:
        key = (cfg.data, cfg.skip_bad_photos)
        read[key] = read.get(key) or load_manifest(resolve_data(cfg.data), skip_bad_photos=cfg.skip_bad_photos)
        check_cohort(cfg, read[key])

