"""The automatic threshold and the review on real CelebA faces (dlib; photos read from ../shared at test time, only
manifests under tmp_path): renamed people kept together, nothing merged on CelebA identities as they are, a
reviewed decisions file honoured, the group bound on a cohort of strangers, the review page kept local and keyed
like audit.csv, and `--evaluate` writing a curve the audit reads."""
from __future__ import annotations

import re

import mlflow
import numpy as np
import pandas as pd
import pytest

from cushing.data.audit import merged_groups
from cushing.data.audit.settings import OUTCOMES, TOGETHER
from cushing.data.audit.sameperson import check_curve
from cushing.data.audit.threshold import read_curve
from cushing.workflows.cohort_audit import run_audit, run_evaluation

pytestmark = pytest.mark.dlib
RENAMED = 6


def _one_sex(df: pd.DataFrame) -> pd.DataFrame:
    df = df.copy()
    df["sex"] = df["subject_id"].map(df.groupby("subject_id")["sex"].agg(lambda s: s.mode()[0]))
    return df


@pytest.fixture(scope="module")
def pool(celeba_manifest):
    """6 identities with two photos each, the second photo under a new id; 60 strangers (one photo each)."""
    df = _one_sex(celeba_manifest)
    counts = df["subject_id"].value_counts()
    twins = sorted(counts[counts >= 2].index)[:RENAMED]
    pairs = df[df["subject_id"].isin(twins)].groupby("subject_id").head(2).copy()
    pairs["label"] = pairs.groupby("subject_id")["label"].transform("first")  # CelebA's Chubby is per photo
    second = pairs.groupby("subject_id").cumcount() == 1
    pairs["subject_id"] = pairs["subject_id"].astype(str)
    pairs.loc[second, "subject_id"] += "_renamed"
    strangers = df[~df["subject_id"].isin(twins)].drop_duplicates("subject_id").sample(60, random_state=3)
    strangers["subject_id"] = strangers["subject_id"].astype(str)
    return pairs, strangers


def _manifest(table: pd.DataFrame, path) -> str:
    table[["image", "label", "sex", "subject_id"]].to_csv(path, index=False)
    return str(path)


@pytest.fixture(scope="module")
def planted(pool, tmp_path_factory):
    d = tmp_path_factory.mktemp("planted")
    pairs, strangers = pool
    table = pd.concat([pairs, strangers.head(24)], ignore_index=True)
    m = _manifest(table, d / "manifest.csv")
    res = run_audit(manifest=m, out=str(d / "out"), cache_dir=str(d.parent / "audit-cache"), workers=2,
                    track=False, progress=False)
    return res, table, d


def _true_pair(table: pd.DataFrame, a: int, b: int) -> bool:
    ids = table["subject_id"].str.removesuffix("_renamed").to_numpy()
    return ids[a - 2] == ids[b - 2]


def test_planted_renamed_people_are_kept_together_at_the_automatic_threshold(planted):
    res, table, d = planted
    c = res.audit.choice
    assert c.auto and c.threshold <= c.threshold_curve and c.expected_false_pairs <= 0.2 * c.photos + 1e-9
    same = res.audit.pairs[res.audit.pairs["kind"] == "same_person"]
    kept = same[same["outcome"].isin(TOGETHER)]
    found = {(a, b) for a, b in zip(kept["line_a"], kept["line_b"]) if _true_pair(table, a, b)}
    assert len(found) >= RENAMED - 2, f"only {len(found)} of {RENAMED} renamed people found at t={c.threshold}"
    merged = same[same["outcome"] == "merged"]
    assert (merged["distance"] < c.strict).all() and c.strict < c.threshold and c.expected_false_merges <= 0.05
    assert all(_true_pair(table, a, b) for a, b in zip(merged["line_a"], merged["line_b"])), "merged a stranger"
    # strangers may merge (the rule allows 0.2 expected false pairs per photo, about half of them mutual): as
    # many as the curve expects, give or take chance, and never into a group over the bound
    below = same[same["distance"] < c.threshold]
    strangers = len(below) - sum(_true_pair(table, a, b) for a, b in zip(below["line_a"], below["line_b"]))
    assert strangers <= max(2 * c.expected_false_pairs, 3), (strangers, c.expected_false_pairs)
    s = res.audit.summary()
    assert s["audit/largest_group"] <= c.group_limit
    summary = dict(pd.read_csv(d / "out" / "audit_summary.csv").values)
    assert float(summary["audit/threshold"]) == pytest.approx(c.threshold)
    assert float(summary["audit/strict_distance"]) == pytest.approx(c.strict)
    assert float(summary["audit/largest_group"]) == s["audit/largest_group"] >= 2
    assert s["audit/pairs_merged"] == len(merged) and s["audit/pairs_precaution"] == len(kept) - len(merged)
    assert s["audit/merged_subjects"] + s["audit/precaution_subjects"] >= len(found)
    assert summary["audit_threshold"] == "auto"
    # how well recall is known with the test patients per sex (the line `cushing size` and model cards give)
    counts = [int(n) for n in re.findall(r"(\d+) (?:female|male)", summary["cohort_size"])]
    assert res.size == summary["cohort_size"] and len(counts) == table["sex"].nunique()
    assert sum(counts) <= table.loc[table["label"] == 1, "subject_id"].nunique()
    assert ("±" in summary["cohort_size"]) == (sum(counts) > 0), summary["cohort_size"]


def test_nothing_is_merged_on_celeba_identities_as_they_are(pool, tmp_path_factory):
    """No one under two ids (the photos of the planted people under their own ids, and 60 strangers): the audit
    still suspects some strangers below its threshold and keeps them together as a precaution, but merges none."""
    d = tmp_path_factory.mktemp("as-they-are")
    pairs, strangers = pool
    table = pd.concat([pairs.assign(subject_id=pairs["subject_id"].str.removesuffix("_renamed")), strangers])
    res = run_audit(manifest=_manifest(table, d / "manifest.csv"), out=str(d / "out"), review=str(d / "review.html"),
                    cache_dir=str(d.parent / "audit-cache"), workers=2, track=False, progress=False)
    p, s = res.audit.pairs, res.audit.summary()
    assert not p.loc[~p["same_subject"], "outcome"].eq("merged").any() and s["audit/merged_subjects"] == 0
    assert s["audit/pairs_precaution"] >= 1 and s["audit/precaution_subjects"] >= 1, "the band was not exercised"
    html = (d / "review.html").read_text()
    assert OUTCOMES["merged"] not in html and f"{s['audit/pairs_precaution']:.0f} {OUTCOMES['precaution']}" in html


def test_a_decisions_file_releases_a_kept_pair_and_merges_a_near_miss(planted):
    res, table, d = planted
    audit = pd.read_csv(res.out)
    kept = audit[(audit["kind"] == "same_person") & audit["decision"].isin(TOGETHER)]
    undo = kept.index[0]
    force = audit.index[(audit["kind"] == "same_person") & (audit["decision"] == "below_threshold")][0]
    audit["verdict"] = ""
    audit.loc[undo, "verdict"], audit.loc[force, "verdict"] = "different", "same"
    audit.to_csv(d / "reviewed.csv", index=False)
    again = run_audit(manifest=str(d / "manifest.csv"), out=str(d / "out2"), decisions=str(d / "reviewed.csv"),
                      cache_dir=str(d.parent / "audit-cache"), workers=2, track=False, progress=False).audit
    assert again.computed == 0, "descriptors come from the cache"
    rows = again.pairs.set_index(["kind", "line_a", "line_b"])
    key = lambda i: ("same_person", audit.at[i, "line_a"], audit.at[i, "line_b"])  # noqa: E731
    assert rows.loc[key(undo), "verdict"] == "different" and rows.loc[key(undo), "outcome"] == "released"
    assert rows.loc[key(force), "verdict"] == "same" and rows.loc[key(force), "outcome"] == "merged"
    groups = merged_groups(again.pairs, table["subject_id"])
    a, b = (int(audit.at[undo, c]) - 2 for c in ("line_a", "line_b"))
    assert groups.iat[a] != groups.iat[b], "a pair marked different was merged"
    a, b = (int(audit.at[force, c]) - 2 for c in ("line_a", "line_b"))
    assert groups.iat[a] == groups.iat[b], "a pair marked same was not merged"
    s = again.summary()
    assert s["audit/decisions_same"] == 1 and s["audit/decisions_different"] == 1 and s["audit/pairs_released"] == 1
    assert again.params()["audit_decisions_sha256"] == again.decisions.digest


def test_the_largest_merged_group_stays_within_the_bound_on_strangers(pool, tmp_path_factory):
    d = tmp_path_factory.mktemp("strangers")
    _, strangers = pool
    women = strangers[strangers["sex"] == "F"]
    m = _manifest(women, d / "manifest.csv")
    audit = run_audit(manifest=m, out=str(d / "out"), cache_dir=str(d.parent / "audit-cache"), workers=2,
                      track=False, progress=False).audit
    n = len(women)
    limit = max(int(np.floor(0.05 * n)), 3)
    groups = merged_groups(audit.pairs, audit.photos["subject"])
    sizes = audit.photos.groupby(groups)["subject"].agg(["size", "nunique"])
    largest = int(sizes.loc[sizes["nunique"] >= 2, "size"].max()) if (sizes["nunique"] >= 2).any() else 0
    assert largest <= limit and audit.summary()["audit/largest_group"] == largest
    flagged = audit.pairs[audit.pairs["decision"].isin(["merged", "precaution", "review"])]
    assert len(flagged) >= 1, "nothing below the threshold: the bound was not exercised"


def test_review_page_shows_each_pair_and_is_not_logged_by_default(planted, tracking, tmp_path):
    res, table, d = planted
    page = tmp_path / "review.html"
    run = run_audit(manifest=str(d / "manifest.csv"), out=str(tmp_path / "out"), review=str(page),
                    cache_dir=str(d.parent / "audit-cache"), workers=2, progress=False)
    html = page.read_text()
    shown = run.audit.pairs[run.audit.pairs["outcome"].isin(["merged", "precaution", "review"])]
    assert html.count("class='pair ") == len(shown) > 0
    rows = pd.read_csv(d / "manifest.csv")
    logged = pd.read_csv(tmp_path / "out" / "audit.csv").set_index("pair")
    for r in shown.itertuples():  # one key for a pair on the page and in audit.csv
        assert f"<b>pair {r.pair}</b>" in html and f"lines {r.line_a} and {r.line_b}" in html
        assert (logged.at[r.pair, "line_a"], logged.at[r.pair, "line_b"]) == (r.line_a, r.line_b)
        for line in (r.line_a, r.line_b):  # named as the manifest names it, for the reviewer to look up
            assert f"{rows['image'][line - 2]} ({rows['subject_id'][line - 2]})" in html
    assert html.count("data:image/jpeg;base64,") == 2 * len(shown)
    c = mlflow.MlflowClient()
    logged = {a.path for a in c.list_artifacts(run.run_id)} | {a.path for a in c.list_artifacts(run.run_id, "review")}
    assert {"audit.csv", "audit_summary.csv"} <= logged and not any("review" in p for p in logged)
    params = c.get_run(run.run_id).data.params
    assert params["audit_threshold"] == "auto" and not any(".jpg" in v or "/" in v for v in params.values())
    allowed = run_audit(manifest=str(d / "manifest.csv"), out=str(tmp_path / "out"), review=str(page),
                        allow_phi=True, cache_dir=str(d.parent / "audit-cache"), workers=2, progress=False)
    assert [a.path for a in c.list_artifacts(allowed.run_id, "review")] == ["review/review.html"]


def test_cli_refuses_a_malformed_decisions_file_naming_file_and_line(planted, tmp_path, capsys):
    from cushing.cli import main

    _, _, d = planted
    bad = tmp_path / "reviewed.csv"
    bad.write_text("line_a,line_b,verdict\n2,3,same\n4,5,probably\n")
    rc = main(["audit", "--manifest", str(d / "manifest.csv"), "--out", str(tmp_path / "out"), "--decisions",
               str(bad), "--cache-dir", str(d.parent / "audit-cache"), "--workers", "1", "--no-track"])
    err = capsys.readouterr().err
    assert rc == 2 and f"{bad} line 3: verdict must be same or different" in err


def test_evaluate_writes_a_curve_the_audit_reads(planted, celeba_dir, tmp_path):
    res, _, d = planted
    _, info = run_evaluation(manifest=str(celeba_dir / "manifest.csv"), out=str(tmp_path / "ev"), photos=30,
                             dup_photos=10, cache_dir=str(d.parent / "audit-cache"), workers=2)
    curve = read_curve(info["curve"])
    n = curve.meta["photos"]
    t = curve.table
    assert (t["neg_pairs_all"] + t["pos_pairs_all"] == int(n) * (int(n) - 1) // 2).all()
    assert (np.diff(t["false_pairs_all"]) >= 0).all() and (t["pos_pairs_all"] > 0).all()
    assert list(t.columns) == list(read_curve().table.columns), "the shipped file's format"
    assert check_curve(curve, res.audit.choice and _fingerprint(d), True) == []
    own = run_audit(manifest=str(d / "manifest.csv"), out=str(tmp_path / "out"), curve=info["curve"],
                    cache_dir=str(d.parent / "audit-cache"), workers=2, track=False, progress=False).audit
    assert own.choice.auto and own.choice.curve == "same_person_curve.csv"
    assert own.params()["audit_curve_sha256"] == curve.sha256 != res.audit.params()["audit_curve_sha256"]


def _fingerprint(d):
    from cushing.data.audit import AuditSettings
    from cushing.data.audit.descriptors import _face_fingerprint

    return _face_fingerprint(AuditSettings(), d.parent / "audit-cache" / "weights_hashes.json")
