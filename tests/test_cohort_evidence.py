"""Trust the cohort before the model: the audit before splitting (same person under two ids, the demo cohort left
alone), any subgroup column reported like sex, and the model card of a registered version."""
from __future__ import annotations

import math
import re

import mlflow
import pandas as pd
import pytest

from cushing.config import TrainConfig
from cushing.data.audit.settings import TOGETHER
from cushing.stats.subgroups import SubgroupError
from cushing.model.train import AuditError, prepare_cohort
from tests.conftest import env_vars

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def renamed_people(celeba_manifest, tmp_path_factory):
    """Real CelebA identities with several photos, half of each identity's photos entered under a made-up second
    id (a follow-up visit registered anew), among single-photo strangers."""
    df = celeba_manifest.copy()
    sex = df.groupby("subject_id")["sex"].agg(lambda s: s.mode().iloc[0])  # CelebA's Male attribute is noisy
    df["sex"] = df["subject_id"].map(sex)
    counts = df["subject_id"].value_counts()
    multi = counts[counts >= 6].index[:6]
    people = df[df["subject_id"].isin(multi)].groupby("subject_id").head(6).copy()
    people["label"] = people.groupby("subject_id")["label"].transform("first")  # CelebA's Chubby is per photo
    second = people.groupby("subject_id").cumcount() >= 3
    people.loc[second, "subject_id"] = people.loc[second, "subject_id"].astype(str) + "-visit2"
    strangers = df[df["subject_id"].map(counts) == 1].groupby("label").head(20)
    cohort = pd.concat([people, strangers], ignore_index=True)
    path = tmp_path_factory.mktemp("renamed") / "manifest.csv"
    cohort.to_csv(path, index=False)
    return path, set(multi.astype(str))


THIN = {"allow_one_class_subgroups": True}  # these CelebA patients are all men: women are one class


@pytest.fixture(scope="module")
def warn_cohort(renamed_people):
    return prepare_cohort(TrainConfig(data=str(renamed_people[0]), model="resnet18", img_size=32, audit="warn",
                                      **THIN), progress=False)


def test_same_person_under_two_ids_is_kept_in_one_split_or_refused(renamed_people, warn_cohort, tmp_path):
    path, people = renamed_people
    cohort = warn_cohort
    pairs = cohort.audit.pairs
    found = pairs[(pairs["kind"] == "same_person") & ~pairs["same_subject"] & pairs["outcome"].isin(TOGETHER)]
    assert len(found) >= 3, "the audit finds renamed visits"
    table = cohort.table
    for a, b in zip(found["line_a"] - 2, found["line_b"] - 2):
        assert cohort.split.iat[a] == cohort.split.iat[b], "a pair kept together never straddles splits"
    kept_people = {str(table["subject_id"].iat[a]).replace("-visit2", "") for a in found["line_a"] - 2}
    assert len(kept_people & people) >= 3 and cohort.merges + cohort.precautions >= 3
    assert not set(pairs["subject_a"]) & set(table["subject_id"].astype(str)), "audit.csv carries hashed ids"
    merged = found[found["outcome"] == "merged"]
    assert len(merged) >= 1 and cohort.merges >= 1, "the closest renamed visits are certain"
    with pytest.raises(AuditError, match=rf"audit=strict\) merged {len(merged)} pair.*\n  pair \d+, lines \d+"):
        prepare_cohort(TrainConfig(data=str(path), model="resnet18", img_size=32, audit="strict", **THIN),
                       progress=False)
    # the ids fixed as the error asks: strict trains, and keeps the suspected pairs together as warn does
    fixed = pd.read_csv(path)
    for a, b in zip(merged["line_a"] - 2, merged["line_b"] - 2):
        fixed.loc[fixed["subject_id"] == fixed.at[b, "subject_id"], "subject_id"] = fixed.at[a, "subject_id"]
    fixed.to_csv(tmp_path / "fixed.csv", index=False)
    strict = prepare_cohort(TrainConfig(data=str(tmp_path / "fixed.csv"), model="resnet18", img_size=32,
                                        audit="strict", **THIN), progress=False)
    kept = strict.audit.pairs[~strict.audit.pairs["same_subject"] & (strict.audit.pairs["outcome"] == "precaution")]
    assert strict.merges == 0 and strict.precautions >= 1 and len(kept) >= 1
    assert all(strict.split.iat[a] == strict.split.iat[b] for a, b in zip(kept["line_a"] - 2, kept["line_b"] - 2))


def test_the_audit_words_reach_the_run_and_the_model_card(warn_cohort, tracking):
    """Merged (certain) and kept as a precaution (suspected) counted apart in the run's tags and metrics and in the
    registered version's card; nothing logged names a real subject id or a photo's file name."""
    from cushing.release.registry import publish_card
    from cushing.workflows.experiment import run_single

    cfg = TrainConfig(data=str(warn_cohort.manifest.source), model="resnet18", pretrained=False, epochs=1, img_size=32,
                      bootstrap=0, cam=False, min_positives=1, experiment="audit-words", **THIN)
    s = run_single(cfg, cohort=warn_cohort, progress=False)
    c = mlflow.MlflowClient()
    run = c.get_run(s.run_id)
    tags, m = run.data.tags, run.data.metrics
    assert tags["audit_merges"] == str(warn_cohort.merges) and tags["audit_precautions"] == str(warn_cohort.precautions)
    assert m["audit/merges"] == warn_cohort.merges and m["audit/precautions"] == warn_cohort.precautions > 0
    assert m["audit/merged_subjects"] == warn_cohort.merges and m["audit/pairs_precaution"] >= 1
    mv = mlflow.register_model(s.model_uri, "cushing")
    c.set_model_version_tag("cushing", mv.version, "source_run", s.run_id)
    md = publish_card("cushing", mv.version)
    assert (f"cohort audit: warn ({warn_cohort.merges} subject ids merged as one photo or one person; "
            f"{warn_cohort.precautions} kept in one split as a precaution, for review)") in md
    path = mlflow.artifacts.download_artifacts(run_id=s.run_id, artifact_path="audit.csv")
    logged = pd.read_csv(path, dtype=str, keep_default_na=False)
    ids = set(warn_cohort.table["subject_id"].astype(str))
    values = {*logged[["subject_a", "subject_b"]].stack(), *tags.values(), *run.data.params.values()}
    assert not ids & values, "a real subject id reached MLflow"
    text = " ".join([open(path).read(), md, *tags.values(), *run.data.params.values()])
    names = {p.rsplit("/", 1)[-1] for p in warn_cohort.table["path"].astype(str)}
    assert "-visit2" not in text and not [n for n in names if n in text], "a file name or made-up id reached MLflow"


def test_the_demo_cohort_is_unaffected_by_the_audit(demo_manifest):
    audited = prepare_cohort(TrainConfig(model="resnet18", img_size=32, audit="warn"), progress=False)
    plain = prepare_cohort(TrainConfig(model="resnet18", img_size=32, audit="off"), progress=False)
    assert audited.audit is not None and audited.audit.pairs.empty and audited.merges == 0
    assert (audited.split == plain.split).all()
    assert audited.audit.settings.faces is False, "no face-recognition distances on drawn faces"


@pytest.fixture(scope="module")
def site_run(tmp_path_factory, demo_manifest, cushing_home):
    """A tiny training on the demo cohort with a made-up `site` column: site C holds few patients."""
    df = pd.read_csv(demo_manifest)
    df["image"] = [str(demo_manifest.parent / p) for p in df["image"]]
    df["site"] = ["C" if (lab == 1 and i % 6 == 0) or (lab == 0 and i % 5 == 0) else "AB"[i % 2]
                  for i, lab in enumerate(df["label"])]
    df["age"] = [20 + (i * 7) % 60 for i in range(len(df))]
    d = tmp_path_factory.mktemp("site")
    df.to_csv(d / "manifest.csv", index=False)
    uri = f"sqlite:///{d / 'mlflow.db'}"
    from cushing.workflows.experiment import run_single

    with env_vars({"MLFLOW_TRACKING_URI": uri}):
        s = run_single(TrainConfig(data=str(d / "manifest.csv"), model="resnet18", pretrained=False, epochs=1,
                                   img_size=32, bootstrap=200, cam=False, log_model=False, subgroups="sex,site",
                                   experiment="sites"), progress=False)
        run = mlflow.MlflowClient().get_run(s.run_id)
        table = pd.read_csv(mlflow.artifacts.download_artifacts(run_id=s.run_id, artifact_path="per_subgroup.csv"))
    return run, table, d


def test_a_site_column_gets_metrics_intervals_and_not_estimable(site_run):
    run, table, _ = site_run
    m, tags = run.data.metrics, run.data.tags
    for site in ("A", "B"):
        assert 0 <= m[f"test/specificity/site:{site}"] <= 1
        assert m[f"test/recall/site:{site}/ci_low"] <= m[f"test/recall/site:{site}"] <= \
            m[f"test/recall/site:{site}/ci_high"]
        assert f"test/f1/site:{site}/ci_low" in m
    assert m["test/positives/site:C"] < 5 and math.isnan(m["test/f1/site:C"])
    assert "test/site:C: precision, recall, f1, auc" in tags["not_estimable"]
    assert "test/f1/gap:site" in m and "test/f1/female" in m, "sex keeps the paper's Table III"
    sites = table[(table["split"] == "test") & (table["column"] == "site")].set_index("group")
    assert set(sites.index) == {"site:A", "site:B", "site:C"} and sites.loc["site:C", "f1"] == "not estimable"
    from cushing.release.registry import PromotionPolicy, rank_candidates

    from cushing.tracking import get_run

    _, _, d = site_run
    with env_vars({"MLFLOW_TRACKING_URI": f"sqlite:///{d / 'mlflow.db'}"}):
        record = get_run(run.info.run_id)
    record.tags["model_uri"] = "models:/none"  # rank as if it had logged a model
    ranked = rank_candidates([record], PromotionPolicy(max_subgroup_gap=0.0))
    assert "site gap" in ranked["excluded_because"].iloc[0]


def test_numeric_subgroup_columns_are_refused_with_a_suggestion(site_run):
    _, _, d = site_run
    with pytest.raises(SubgroupError, match=r"'age' is numeric.*age_band"):
        prepare_cohort(TrainConfig(data=str(d / "manifest.csv"), model="resnet18", img_size=32, audit="off",
                                   subgroups="sex,age"), progress=False)


def _card_numbers(md: str) -> dict[str, tuple[float, float]]:
    out = {}
    for metric in ("f1", "auc", "recall", "specificity"):
        row = re.search(rf"^\| {metric} \| ([0-9.]+)[^|]*\| ([0-9.]+)", md, re.M)
        out[metric] = (float(row.group(1)), float(row.group(2)))
    return out


def test_the_promoted_demo_model_has_a_model_card_with_its_numbers(demo_sweep):
    with env_vars({"MLFLOW_TRACKING_URI": demo_sweep["uri"]}):
        c = mlflow.MlflowClient()
        mv = c.get_model_version_by_alias("cushing", "champion")
        run = c.get_run(mv.tags["source_run"])
        md = open(mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="model_card.md")).read()
        names = {a.path for a in c.list_artifacts(run.info.run_id)}
    assert {"model_card.md", "model_card.html"} <= names and mv.description == md
    m = run.data.metrics
    for metric, (val, test) in _card_numbers(md).items():
        assert val == pytest.approx(m[f"val/{metric}"], abs=5e-4) and test == pytest.approx(m[f"test/{metric}"],
                                                                                             abs=5e-4)
    assert "TRAINED ON SYNTHETIC DATA" in md and "not a diagnostic device" in md
    assert f"threshold: {m['threshold']:.4f}" in md and "mlflow run . --env-manager local" in md
    assert ".jpg" not in md and "demo_0" not in md, "no file names or raw subject ids"
