"""Splits: grouped by subject, stratified on label x sex, seeded, deterministic; folds likewise."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from cushing.data.demo import TABLE_I
from cushing.data.manifest import load_manifest
from cushing.data.splits import SplitError, assign_folds, assign_splits, check_no_leak, split_table


@pytest.fixture(scope="module")
def celeba_table(celeba_manifest):
    # several images per subject; one sex per subject (the contract) by majority
    df = celeba_manifest.copy()
    df["sex"] = df["subject_id"].map(df.groupby("subject_id")["sex"].agg(lambda s: s.mode()[0]))
    return df[["image", "label", "sex", "subject_id"]]


def test_no_subject_in_two_splits_ever(celeba_table):
    for seed in range(3):
        split = assign_splits(celeba_table, (1, 1, 1), seed=seed)
        assert split.notna().all()
        per_subject = pd.DataFrame({"s": celeba_table["subject_id"], "split": split}).groupby("s")["split"].nunique()
        assert per_subject.max() == 1
    assert celeba_table["subject_id"].duplicated().any()  # the check is meaningful: subjects have several images


def test_stratified_on_label_and_sex(celeba_table):
    split = assign_splits(celeba_table, (1, 1, 1), seed=0)
    subj = celeba_table.assign(split=split).groupby("subject_id").agg(label=("label", "max"), sex=("sex", "first"),
                                                                      split=("split", "first"))
    counts = subj.groupby(["sex", "label", "split"]).size().unstack("split")
    for _, row in counts.iterrows():
        assert row.max() - row.min() <= 1, row  # subjects of each stratum spread evenly over the three splits


def test_deterministic_and_seeded(celeba_table):
    a = assign_splits(celeba_table, seed=3)
    b = assign_splits(celeba_table, seed=3)
    c = assign_splits(celeba_table, seed=4)
    assert (a == b).all() and (a != c).any()


def test_ratios_respected(celeba_table):
    split = assign_splits(celeba_table, (2, 1, 1), seed=0)
    subj = pd.DataFrame({"s": celeba_table["subject_id"], "split": split}).drop_duplicates("s")
    share = subj["split"].value_counts(normalize=True)
    assert abs(share["train"] - 0.5) < 0.01 and abs(share["val"] - 0.25) < 0.01


def test_manifest_split_is_honoured_and_checked(demo_manifest):
    m = load_manifest(demo_manifest)
    split = assign_splits(m.table, seed=99)
    assert (split == m.table["split"]).all()
    table = split_table(m.table, split)
    got = {(r.split, r.sex, int(r.label)): int(r.subjects) for r in table.itertuples()}
    assert got == TABLE_I  # the paper's Table I, exactly
    leaky = m.table.copy()
    leaky.loc[leaky.index[:2], "subject_id"] = "same"
    leaky.loc[leaky.index[1], "split"] = "test" if leaky.loc[leaky.index[0], "split"] != "test" else "val"
    with pytest.raises(SplitError, match="more than one split"):
        check_no_leak(leaky, leaky["split"])


def test_folds_group_subjects_balance_strata_and_reproduce(celeba_table):
    f1 = assign_folds(celeba_table, 5, seed=1)
    f2 = assign_folds(celeba_table, 5, seed=1)
    assert (f1 == f2).all() and (assign_folds(celeba_table, 5, seed=2) != f1).any()
    per_subject = pd.DataFrame({"s": celeba_table["subject_id"], "f": f1}).groupby("s")["f"].nunique()
    assert per_subject.max() == 1
    pos_subjects = celeba_table.assign(f=f1).groupby("subject_id").agg(label=("label", "max"), f=("f", "first"))
    per_fold = pos_subjects[pos_subjects["label"] == 1]["f"].value_counts()
    assert per_fold.max() - per_fold.min() <= 1
    assert sorted(np.unique(f1)) == [0, 1, 2, 3, 4]


def test_folds_keep_audit_merged_subjects_together_and_honour_strata(celeba_table):
    """Two ids the cohort audit found to be one person are one unit for cross-validation, as for the split."""
    subjects = sorted(celeba_table["subject_id"].unique())
    free = assign_folds(celeba_table, 5, seed=3)
    fold_of = pd.Series(free.to_numpy(), index=celeba_table["subject_id"]).groupby(level=0).first()
    a = subjects[0]
    b = next(s for s in subjects if fold_of[s] != fold_of[a])  # a pair the plain folds put apart
    groups = celeba_table["subject_id"].replace({b: a})
    merged = assign_folds(celeba_table, 5, seed=3, groups=groups)
    assert merged[celeba_table["subject_id"].isin([a, b])].nunique() == 1
    site = celeba_table.assign(site=np.where(celeba_table["subject_id"].isin(subjects[::2]), "A", "B"))
    folds = assign_folds(site, 5, seed=3, strata=("label", "site"))
    per = site.assign(f=folds).groupby("subject_id").agg(site=("site", "first"), f=("f", "first"))
    counts = per[per["site"] == "A"]["f"].value_counts()
    assert counts.max() - counts.min() <= 1  # site balanced across folds
    with pytest.raises(SplitError, match="needs at least 5 subjects"):
        assign_folds(celeba_table[celeba_table["subject_id"].isin(subjects[:3])], 5)


def test_claims_count_patients_and_controls_as_people_not_photos():
    """Two patients with six photos each in val are two patients: fewer than min_positives=5, refused; a subgroup
    whose only patient has six photos still has one patient."""
    from cushing.data.splits import claim_problems

    rows = [("train", f"p{i}", 1, "F") for i in range(6)] + [("train", f"c{i}", 0, "F") for i in range(6)]
    rows += [("val", f"vp{i % 2}", 1, "F") for i in range(12)] + [("val", f"vc{i}", 0, "F") for i in range(12)]
    rows += [("test", f"tp{i}", 1, "F") for i in range(6)] + [("test", "tm", 1, "M")] * 6
    rows += [("test", f"tc{i}", 0, s) for i in range(12) for s in "FM"]
    t = pd.DataFrame(rows, columns=["split", "subject_id", "label", "sex"])
    out = claim_problems(t, {"": t["split"]}, min_positives=5, subgroups=("sex",), allow_few=False,
                         allow_one_class=False)
    assert out == ["fewer patients than min_positives=5 (val 2): too few for its metrics to mean much "
                   "(--allow-few-positives true trains anyway)"]
    one = t[t["subject_id"] != "tm"]
    assert "test sex=M: 0 patients, 12 controls" in claim_problems(
        one, {"": one["split"]}, min_positives=1, subgroups=("sex",), allow_few=False, allow_one_class=False)[0]
