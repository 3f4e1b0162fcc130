"""The automatic same-person threshold on synthetic descriptors and curves (cheap, deterministic): the curve rule,
the strict distance, pair counts by sex, mutual nearest neighbours around a hub face, the group-size guard, a
person's verdicts, the decisions file's errors, and the curve counts against brute force."""
from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
import pytest

from cushing.data.audit import AuditSettings
from cushing.data.audit.curvefile import GRID, curve_counts, curve_table, write_curve
from cushing.data.audit.decisions import DecisionsError, read_decisions
from cushing.data.audit.sameperson import same_person_pairs
from cushing.data.audit.threshold import SHIPPED_CURVE, curve_threshold, expected_false_pairs, guarded_threshold, \
    mutual_pairs, nearest_strangers, pair_counts, read_curve, strict_distance


def _step_curve(tmp_path, step: float = 0.5, band: float = 0.33):
    """A curve whose stranger pairs never come closer than `band`, 1 in 1000 does from there and all from `step`:
    t_curve is the grid distance just below `step` and the strict distance the one below `band` (for a cohort of
    51 to 7,800 photo pairs)."""
    n = 1000
    false = (GRID >= step).astype(np.int64) * n + ((GRID >= band) & (GRID < step))
    counts = {f"false_{g}": false for g in ("all", "F", "M", "mixed")}
    counts.update({f"neg_{g}": n for g in ("all", "F", "M", "mixed")})
    counts.update({f"true_{g}": np.zeros(len(GRID), np.int64) for g in ("all", "F", "M")})
    counts.update({f"pos_{g}": 1 for g in ("all", "F", "M")})
    return write_curve(curve_table(counts), tmp_path / "curve.csv", fingerprint={}, cohort="synthetic",
                       manifest_sha256="", photos=0, identities=0, flip_average=True, command="test")


def _hub_cohort():
    """A hub face 0.35 from 8 strangers (each other 0.53 apart, a regular simplex), 5 people entered twice (0.2
    apart) and 20 strangers far from everything: 39 photos, each cluster around its own axis."""
    dim, rows, subjects = 128, [], []
    centre = lambda k: 3.0 * np.eye(dim)[100 + k]  # noqa: E731
    simplex = np.eye(8) - 1 / 8
    simplex /= np.linalg.norm(simplex, axis=1, keepdims=True)
    rows.append(centre(0))
    subjects.append("hub")
    for i in range(8):
        rows.append(centre(0) + 0.35 * np.pad(simplex[i], (0, dim - 8)))
        subjects.append(f"sat{i}")
    for k in range(5):
        rows += [centre(1 + k), centre(1 + k) + 0.2 * np.eye(dim)[20 + k]]
        subjects += [f"p{k}", f"p{k}_b"]
    for k in range(20):
        rows.append(centre(6 + k))
        subjects.append(f"s{k}")
    return np.array(rows, np.float32), np.array(subjects, dtype=object), np.array(["F"] * len(rows), dtype=object)


def test_pair_counts_by_sex_leave_out_each_subjects_own_pairs():
    sex = np.array(["F", "F", "F", "M", "M", "", "F"], dtype=object)
    subj = np.array(["a", "a", "b", "c", "c", "d", "e"], dtype=object)
    want = {"F": 0, "M": 0, "mixed": 0, "unknown": 0}
    for i, j in itertools.combinations(range(len(sex)), 2):
        if subj[i] == subj[j]:
            continue
        pair = {sex[i], sex[j]}
        want["F" if pair == {"F"} else "M" if pair == {"M"} else "mixed" if pair == {"F", "M"} else "unknown"] += 1
    assert pair_counts(sex, subj) == want


def test_curve_threshold_is_the_loosest_grid_distance_within_the_bound():
    curve = read_curve()
    for n_f, n_m in ((292, 51), (172, 171), (100, 0), (1000, 0)):
        sex = np.array(["F"] * n_f + ["M"] * n_m, dtype=object)
        counts = pair_counts(sex, np.arange(len(sex)))
        t, e = curve_threshold(curve, counts, len(sex), 0.2)
        grid, all_e = curve.grid, expected_false_pairs(curve, counts)
        i = int(np.flatnonzero(grid == t)[0])
        assert e == all_e[i] <= 0.2 * len(sex) < all_e[i + 1], (n_f, n_m, t)
    paper = pair_counts(np.array(["F"] * 292 + ["M"] * 51, dtype=object), np.arange(343))
    assert curve_threshold(curve, paper, 343, 0.2)[0] == 0.525, "the figure the docs quote (cohort-audit.md)"


def test_strict_distance_is_where_the_whole_cohort_expects_near_zero_false_pairs():
    curve = read_curve()
    for n_f, n_m in ((292, 51), (85, 15), (1000, 0)):
        counts = pair_counts(np.array(["F"] * n_f + ["M"] * n_m, dtype=object), np.arange(n_f + n_m))
        t, e = strict_distance(curve, counts, 0.05), expected_false_pairs(curve, counts)
        i = int(np.flatnonzero(curve.grid == t)[0])
        assert e[i] <= 0.05 < e[i + 1] and t < curve_threshold(curve, counts, n_f + n_m, 0.2)[0], (n_f, n_m, t)
    paper = pair_counts(np.array(["F"] * 292 + ["M"] * 51, dtype=object), np.arange(343))
    assert strict_distance(curve, paper, 0.05) == 0.32, "the figure the docs quote (cohort-audit.md)"
    big = pair_counts(np.array(["F", "M"] * 1500, dtype=object), np.arange(3000))
    assert strict_distance(curve, big, 0.05) == 0.0, "even the grid's first distance expects too many: no merges"


def test_mutual_nearest_neighbours_bound_what_a_hub_can_merge():
    x, subj, _ = _hub_cohort()
    codes = pd.factorize(pd.Series(subj))[0]
    nn = nearest_strangers(x, codes, 2)
    hub_pairs = [(0, j) for j in range(1, 9)]
    mutual = mutual_pairs(*np.array(hub_pairs).T, nn)
    assert mutual.sum() == 2, "the hub is close to 8 strangers but mutual with its 2 nearest only"
    twins = np.array([(9 + 2 * k, 10 + 2 * k) for k in range(5)])
    assert mutual_pairs(twins[:, 0], twins[:, 1], nn).all()
    lone = nearest_strangers(x[:1], codes[:1], 2)
    assert (lone == -1).all(), "a photo with no other subject has no neighbours"


def test_guard_lowers_the_threshold_until_the_largest_group_fits():
    edges = pd.DataFrame({"a": [0, 1, 2, 3], "b": [1, 2, 3, 4], "distance": [0.401, 0.423, 0.441, 0.462]})
    ones = np.ones(5, int)
    assert guarded_threshold(edges, ones, GRID, 0.5, limit=5) == (0.5, 5)
    assert guarded_threshold(edges, ones, GRID, 0.5, limit=3) == (0.44, 3), "stops before the 4th photo joins"
    t, biggest = guarded_threshold(edges, ones, GRID, 0.5, limit=3, forced=[(2, 3)])
    assert (t, biggest) == (0.42, 2), "a forced pair counts in the groups the guard bounds"
    three_photo_subject = np.array([3, 1, 1, 1, 1])
    assert guarded_threshold(edges, three_photo_subject, GRID, 0.5, limit=3) == (0.42, 4), \
        "groups count photos; two subjects (one person under two ids) may merge past the limit, a third may not"


def test_hub_cohort_merges_people_entered_twice_and_keeps_the_hub_as_a_precaution(tmp_path):
    x, subj, sex = _hub_cohort()
    s = AuditSettings(curve=str(_step_curve(tmp_path)))
    df, choice = same_person_pairs(x, subj, sex, s)
    assert choice.auto and choice.threshold == choice.threshold_curve == 0.495 and not choice.guard_bound
    assert choice.strict == 0.325 and choice.expected_false_merges == 0.0
    twins = {(9 + 2 * k, 10 + 2 * k) for k in range(5)}
    assert set(zip(*df.loc[df["decision"] == "merged", ["i", "j"]].to_numpy().T)) == twins, "0.2 apart: certain"
    hub = df[df["i"] == 0]  # 0.35 from its satellites: past the strict distance, so suspected only
    assert (hub["decision"] == "precaution").sum() == 2 and (hub["decision"] == "review").sum() == 6
    assert (df["decision"] == "precaution").sum() == 2 and (df["decision"] == "below_threshold").sum() == s.near_misses
    assert (df["distance"].diff().dropna() >= 0).all(), "closest first"


def test_verdicts_override_merges_and_the_guard_counts_forced_ones(tmp_path):
    x, subj, sex = _hub_cohort()
    s = AuditSettings(curve=str(_step_curve(tmp_path)))
    verdicts = {(11, 12): "different", (30, 40): "same"}  # lines: a planted pair; two far strangers
    df, _ = same_person_pairs(x, subj, sex, s, verdicts=verdicts)
    row = df.set_index(["i", "j"])
    assert row.loc[(9, 10), "verdict"] == "different" and row.loc[(9, 10), "decision"] == "merged"
    assert row.loc[(28, 38), "verdict"] == "same" and row.loc[(28, 38), "decision"] == "below_threshold"
    assert row.loc[(28, 38), "distance"] == pytest.approx(3.0 * np.sqrt(2), rel=1e-5)
    # a satellite outside the hub's 2 nearest marked the same person as the hub: hub + it + the 2 mutual
    # satellites would be 4 photos > 3, so the guard lowers t below the hub's mutual pairs (0.35)
    forced = {(2, 7): "same"}
    df, choice = same_person_pairs(x, subj, sex, s, verdicts=forced)
    assert choice.guard_bound and choice.threshold < 0.35 + 1e-6 and choice.group_limit == 3
    assert not df.loc[df["i"] == 0, "decision"].isin(["merged", "precaution"]).any(), "the hub joins nobody else"


def test_fixed_threshold_has_no_guard_and_reports_expected_pairs():
    x, subj, sex = _hub_cohort()
    df, choice = same_person_pairs(x, subj, sex, AuditSettings(same_person_max_distance=0.3))
    assert not choice.auto and choice.threshold == 0.3 and np.isfinite(choice.expected_false_pairs)
    assert choice.strict == 0.3, "the shipped curve's strict distance for these 39 photos (0.425), capped at t"
    assert set(df.loc[df["distance"] < 0.3, "decision"]) == {"merged"}
    assert (df["decision"] == "review").sum() == 0, "the hub pairs (0.35) are near misses at 0.3"


def _decisions(tmp_path, text: str):
    p = tmp_path / "reviewed.csv"
    p.write_text(text)
    return p


@pytest.mark.parametrize("text, message", [
    ("line_a,line_b\n2,3\n", "needs the columns line_a, line_b and verdict"),
    ("line_a,line_b,verdict\n2,3,same\n4,5,maybe\n", "line 3: verdict must be same or different"),
    ("line_a,line_b,verdict\n2,x,same\n", "line 2: line_a and line_b must be manifest line numbers"),
    ("line_a,line_b,verdict\n2,2,same\n", "line 2: line_a and line_b must be two different data lines"),
    ("line_a,line_b,verdict\n2,3,same\n3,2,different\n", "line 3: lines 2 and 3 are marked different here and "
                                                         "same on line 2"),
    ("line_a,line_b,verdict,subject_a,subject_b\n2,3,same,h0,h9\n", "line 2: lines 2 and 3 now hold other"),
])
def test_a_malformed_decisions_file_names_the_file_and_line(tmp_path, text, message):
    p = _decisions(tmp_path, text)
    with pytest.raises(DecisionsError) as e:
        read_decisions(p, np.array(["h0", "h1", "h2", "h3"]))
    assert str(p) in str(e.value) and message in str(e.value)


def test_decisions_file_reads_verdicts_and_counts_lines_not_in_the_manifest(tmp_path):
    p = _decisions(tmp_path, "kind,line_a,line_b,verdict,subject_a,subject_b\nsame_person,3,2,Same,h1,h0\n"
                             "same_person,4,5,,h2,h3\nsame_person,2,99,different,,\n")
    d = read_decisions(p, np.array(["h0", "h1", "h2", "h3"]))
    assert d.verdicts == {(2, 3): "same"} and d.unmatched == 1 and len(d.digest) == 64
    with pytest.raises(DecisionsError, match="not found"):
        read_decisions(tmp_path / "nope.csv", np.array(["h0"]))


def test_curve_counts_match_a_brute_force_count():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 128)).astype(np.float32) * 0.04
    subj = np.repeat(np.arange(30), 2).astype(object)
    sex = np.where(np.arange(60) < 36, "F", "M").astype(object)
    got = curve_counts(x, subj, sex, block_rows=7)
    d = np.linalg.norm(x[:, None].astype(np.float64) - x[None].astype(np.float64), axis=2)
    iu, ju = np.triu_indices(60, 1)
    same = subj[iu] == subj[ju]
    ff = (sex[iu] == "F") & (sex[ju] == "F")
    for t_idx in (0, 40, 70):
        t = GRID[t_idx]
        assert got["false_all"][t_idx] == int(((d[iu, ju] < t) & ~same).sum())
        assert got["true_all"][t_idx] == int(((d[iu, ju] < t) & same).sum())
        assert got["false_F"][t_idx] == int(((d[iu, ju] < t) & ~same & ff).sum())
    assert got["neg_all"] + got["pos_all"] == 60 * 59 // 2 and got["pos_all"] == 30


def test_the_shipped_curve_is_package_data_in_its_declared_format():
    curve = read_curve()
    assert curve.path == SHIPPED_CURVE and curve.meta["landmarks"] == "shape_predictor_68_face_landmarks"
    assert (np.diff(curve.rates("F")) >= 0).all() and len(curve.grid) == len(GRID)
    text = open("pyproject.toml").read()
    assert "same_person_curve.csv" in text, "the curve must ship in the wheel (package-data)"
