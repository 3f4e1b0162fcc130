"""Bad input that used to slip through: refused at validation with its line, or reported by the face stage with
a reason code, never a traceback at the end of a long job."""
from __future__ import annotations

import os
import subprocess
import sys

import pandas as pd
import pytest
from PIL import Image

from tests.conftest import bomb_png

pytestmark = pytest.mark.faults


def _env(tmp_path) -> dict:
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    env.pop("MLFLOW_RUN_ID", None)
    return env


def test_truncated_and_oversized_images_are_refused_at_validation_with_their_lines(tmp_path, celeba_manifest):
    rows = celeba_manifest.head(4).copy()
    raw = open(rows["image"].iloc[0], "rb").read()
    (tmp_path / "truncated.jpg").write_bytes(raw[: len(raw) * 2 // 3])  # opens fine; the data ends early
    (tmp_path / "huge.png").write_bytes(bomb_png(10_000, 10_000))  # 100 megapixels: over 64, under Pillow's 179
    rows.loc[rows.index[2], "image"] = str(tmp_path / "truncated.jpg")
    rows.loc[rows.index[3], "image"] = str(tmp_path / "huge.png")
    rows["subject_id"] = [f"s{i}" for i in range(4)]
    rows.to_csv(tmp_path / "manifest.csv", index=False)
    work = tmp_path / "work"
    work.mkdir()
    r = subprocess.run([sys.executable, "-m", "cushing", "train", "--data", str(tmp_path / "manifest.csv"),
                        "--pretrained", "false"], cwd=work, env=_env(work), capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert "line 4: " in r.stderr and "truncated" in r.stderr
    assert "line 5: " in r.stderr and "decompression_bomb" in r.stderr and "100,000,000 pixels" in r.stderr
    assert "line 2" not in r.stderr and "line 3" not in r.stderr, "good photos are not blamed"
    assert list(work.iterdir()) == [], "nothing written: no store, no run"


def _run_faces(tmp_path, manifest, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cushing", "faces", "--manifest", str(manifest), "--out",
                           str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache"), "--workers", "1", *extra],
                          cwd=tmp_path, env=_env(tmp_path), capture_output=True, text=True, timeout=300)


def _faces_run(tmp_path):
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    c = mlflow.MlflowClient()
    (run,) = c.search_runs([c.get_experiment_by_name("cushing").experiment_id])
    return run


def _unusable(tmp_path):
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "text.jpg").write_bytes(b"not a photo\n" * 30)
    pd.DataFrame({"image": ["empty.jpg", "text.jpg", "missing.jpg"], "label": [0, 1, 0], "sex": ["F", "M", "F"]}
                 ).to_csv(tmp_path / "photos.csv", index=False)
    return tmp_path / "photos.csv"


def test_faces_refuses_photos_it_cannot_find_or_read_naming_each_and_writing_nothing(tmp_path):
    r = _run_faces(tmp_path, _unusable(tmp_path))
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    for line in ("line 2: empty.jpg: not a readable image (empty_file", "line 3: text.jpg: not a readable image "
                 "(not_an_image", "line 4: missing.jpg: file not found"):
        assert line in r.stderr, r.stderr
    assert "3 photos cannot be found or read: --skip-bad-photos true leaves them out" in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.jpg", "photos.csv", "text.jpg"], \
        "nothing written: no out/ (no empty crops/), no store, no run"


def test_faces_with_no_usable_photo_says_so_and_logs_its_audit(tmp_path):
    r = _run_faces(tmp_path, _unusable(tmp_path), "--skip-bad-photos", "true")
    assert r.returncode == 3 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert "cushing faces: no face could be extracted" in r.stderr
    assert list(pd.read_csv(tmp_path / "out" / "manifest.csv").columns)[:3] == ["image", "label", "sex"]
    report = pd.read_csv(tmp_path / "out" / "faces_report.csv")
    assert sorted(report["reason"]) == ["empty_file", "file_not_found", "not_an_image"]
    assert list(report["line"]) == [2, 3, 4], "the report keeps the manifest's lines"
    run = _faces_run(tmp_path)
    assert run.info.status == "FINISHED" and run.data.metrics["faces/extracted"] == 0
    m = run.data.metrics
    assert (m["skipped_photos"], m["skipped_photos/patient"], m["skipped_photos/control"],
            m["skipped_photos/female"], m["skipped_photos/male"]) == (3, 1, 2, 2, 1)
    assert f"face-stage run {run.info.run_id}" in r.stdout and "audit logged" not in r.stdout


def _with_a_face(rows: pd.DataFrame, tmp_path, n: int) -> pd.DataFrame:
    """The first n of these photos in which dlib finds a face (into the test's face cache)."""
    from cushing.faces.pipeline import extract_faces
    from cushing.faces.settings import FaceSettings

    rows[["image", "label", "sex", "subject_id"]].to_csv(tmp_path / "candidates.csv", index=False)
    report = extract_faces(tmp_path / "candidates.csv", tmp_path / "candidates", FaceSettings(),
                           cache_dir=tmp_path / "cache", progress=False, skip_bad_photos=True).report
    return rows[(report["status"] == "ok").to_numpy()].head(n)


def test_a_photo_without_a_face_stops_faces_unless_skipped_then_it_is_counted(tmp_path, celeba_manifest):
    """The face stage's own rejections (no face found) stop it too, after extraction but before anything is
    written; with --skip-bad-photos the count is printed at the end and logged per class and sex."""
    import numpy as np

    Image.fromarray(np.tile(np.linspace(0, 255, 300, dtype=np.uint8), (300, 1))).convert("RGB").save(
        tmp_path / "wall.png")  # a photo of a wall: readable, no face
    faces = _with_a_face(celeba_manifest.drop_duplicates("subject_id").head(8), tmp_path, 3)
    pd.DataFrame({"image": [*faces["image"], "wall.png"], "label": [0, 0, 0, 1], "sex": ["F", "F", "M", "M"],
                  "subject_id": ["a", "b", "c", "d"]}).to_csv(tmp_path / "photos.csv", index=False)
    r = _run_faces(tmp_path, tmp_path / "photos.csv")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert "1 of 4 photos give no face crop (1 no_face)" in r.stderr and "line 5: wall.png: no_face" in r.stderr
    assert "--skip-bad-photos true" in r.stderr
    assert not (tmp_path / "out").exists() and not (tmp_path / "mlflow.db").exists(), "nothing written, no run"
    assert "extracted" not in r.stdout
    r = _run_faces(tmp_path, tmp_path / "photos.csv", "--skip-bad-photos", "true")
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().splitlines()[-1].startswith("skipped 1 photo"), r.stdout
    m = _faces_run(tmp_path).data.metrics
    assert (m["skipped_photos"], m["skipped_photos/patient"], m["skipped_photos/male"], m["skipped_photos/female"]) \
        == (1, 1, 1, 0)
    assert len(pd.read_csv(tmp_path / "out" / "manifest.csv")) == 3


def test_the_same_pixels_under_two_names_are_reported_not_fatal(tmp_path, celeba_manifest):
    from cushing.data.manifest import load_manifest

    first, other = celeba_manifest["image"].iloc[0], celeba_manifest["image"].iloc[5]
    Image.open(first).save(tmp_path / "copy.png")  # the same photo, re-exported losslessly as PNG
    pd.DataFrame({"image": [first, str(tmp_path / "copy.png"), other], "label": [0, 0, 1], "sex": ["F", "F", "M"],
                  "subject_id": ["a", "b", "c"]}).to_csv(tmp_path / "photos.csv", index=False)
    r = _run_faces(tmp_path, tmp_path / "photos.csv")
    assert r.returncode == 0, r.stderr[-2000:]
    report = pd.read_csv(tmp_path / "out" / "faces_report.csv").set_index("line")
    assert report.loc[3, "reason"] == "duplicate_of" and report.loc[3, "detail"] == "line 2"
    assert report.loc[2, "status"] == "ok"
    crops = load_manifest(tmp_path / "out" / "manifest.csv")  # the output is a valid manifest: no duplicate
    assert len(crops.table) == int((report["status"] == "ok").sum())
    assert _faces_run(tmp_path).info.status == "FINISHED"


# ------------------------------------------------------------------------------------------------ cohorts that cannot
# support a claim: refused before any photo is decoded, any run made or any folder written

TINY = ["--epochs", "1", "--img-size", "32", "--pretrained", "false", "--model", "resnet18"]


def _cushing(work, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    work.mkdir(exist_ok=True)
    return subprocess.run([sys.executable, "-m", "cushing", *args], cwd=work, env=_env(work), capture_output=True,
                          text=True, timeout=timeout)


def _one_class(celeba_manifest, path):
    """40 patients, no control: a sorted file's first rows (one sex per subject, as the contract wants)."""
    df = celeba_manifest.copy()
    df["sex"] = df["subject_id"].map(df.groupby("subject_id")["sex"].agg(lambda s: s.mode()[0]))
    df[df["label"] == 1].drop_duplicates("subject_id").head(40).to_csv(path, index=False)
    return path


def test_a_one_class_cohort_is_refused_by_train_and_the_pipeline_leaving_nothing(tmp_path, celeba_manifest):
    manifest = _one_class(celeba_manifest, tmp_path / "patients.csv")
    for work, args in ((tmp_path / "train", ["train", "--data", str(manifest), *TINY]),
                       (tmp_path / "pipeline", ["pipeline", "--photos", str(manifest), "--model", "resnet18",
                                                "--set", "epochs=1", "--set", "pretrained=false"])):
        r = _cushing(work, *args)
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
        assert r.stderr.strip().splitlines() == [f"cushing {args[0]}: {manifest}: the cohort has 40 patients and 0 "
                                                 "controls: a screening model needs both"], r.stderr[-2000:]
        assert list(work.iterdir()) == [], f"{args[0]}: no store, no run, no folder, no lock"


def test_under_mlflow_run_a_refusal_is_the_launchers_runs_reason(tmp_path, celeba_manifest):
    """`mlflow run` made the run before the command refused the cohort (MLflow then ends it FAILED): the run says
    why, in the same tag as any failed run, and no other run is made."""
    import mlflow

    manifest = _one_class(celeba_manifest, tmp_path / "patients.csv")
    (tmp_path / "work").mkdir()
    c = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'work' / 'mlflow.db'}")
    launcher = c.create_run(c.create_experiment("made-by-mlflow-run")).info.run_id  # as `mlflow run` makes it
    env = {**_env(tmp_path / "work"), "MLFLOW_RUN_ID": launcher}
    r = subprocess.run([sys.executable, "-m", "cushing", "train", "--data", str(manifest), *TINY], cwd=tmp_path / "work",
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 2, r.stderr[-2000:]
    (run,) = c.search_runs([e.experiment_id for e in c.search_experiments()])
    assert run.info.run_id == launcher
    assert run.data.tags["cushing.error"] == (f"SplitError: {manifest}: the cohort has 40 patients and 0 controls: a "
                                              "screening model needs both")


def test_a_pipeline_with_a_missing_photo_is_refused_before_anything_is_made(tmp_path, celeba_manifest):
    rows = celeba_manifest.drop_duplicates("subject_id").head(6).copy()
    rows.loc[rows.index[4], "image"] = str(tmp_path / "typo.jpg")
    rows.to_csv(tmp_path / "photos.csv", index=False)
    work = tmp_path / "work"
    r = _cushing(work, "pipeline", "--photos", str(tmp_path / "photos.csv"), "--model", "resnet18")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert "line 6: " in r.stderr and "typo.jpg: file not found" in r.stderr
    assert "1 photos cannot be found or read: --skip-bad-photos true leaves them out" in r.stderr
    assert list(work.iterdir()) == [], "no FAILED runs, no faces/crops/, no .pipeline.lock"


def _demo(demo_manifest, path, **columns) -> pd.DataFrame:
    df = pd.read_csv(demo_manifest)
    df["image"] = [str(demo_manifest.parent / p) for p in df["image"]]
    df = df.assign(**columns)
    df.to_csv(path, index=False)
    return df


def _patients(df: pd.DataFrame, split: str, **where) -> int:
    sel = (df["split"] == split) & (df["label"] == 1)
    for k, v in where.items():
        sel &= df[k] == v
    return int(sel.sum())


def test_thin_splits_and_one_class_subgroups_name_their_numbers_and_the_option_that_allows_them(
        tmp_path, demo_manifest):
    labels = pd.read_csv(demo_manifest)["label"]  # site C: a quarter of the controls and no patient
    df = _demo(demo_manifest, tmp_path / "manifest.csv",
               site=["C" if lab == 0 and i % 4 == 0 else "AB"[i % 2] for i, lab in enumerate(labels)])
    data = ["--data", str(tmp_path / "manifest.csv"), *TINY, "--bootstrap", "0", "--cam", "false"]
    few = ", ".join(f"{s} {_patients(df, s)}" for s in ("train", "val", "test"))
    r = _cushing(tmp_path / "few", "train", *data, "--min-positives", "20")
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr.strip().splitlines() == [
        f"cushing train: {tmp_path / 'manifest.csv'}: fewer patients than min_positives=20 ({few}): too few for its "
        "metrics to mean much (--allow-few-positives true trains anyway)"]
    r = _cushing(tmp_path / "folds", "train", *data, "--cv-folds", "3", "--min-positives", "60")
    assert r.returncode == 2 and "fold 0 train" in r.stderr and "fold 2 test" in r.stderr, r.stderr[-2000:]
    r = _cushing(tmp_path / "site", "train", *data, "--subgroups", "sex,site")
    assert r.returncode == 2, r.stderr[-2000:]
    controls = {s: int(((df["split"] == s) & (df["site"] == "C")).sum()) for s in ("val", "test")}
    assert f"val site=C: 0 patients, {controls['val']} controls; test site=C: 0 patients, {controls['test']} " \
           "controls" in r.stderr and "(--allow-one-class-subgroups true trains anyway)" in r.stderr
    assert all(not (tmp_path / w).exists() or list((tmp_path / w).iterdir()) == [] for w in ("few", "folds", "site"))
    r = _cushing(tmp_path / "allowed", "train", *data, "--subgroups", "sex,site", "--allow-one-class-subgroups",
                 "true", "--min-positives", "20", "--allow-few-positives", "true", "--log-model", "false")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "test/f1" in r.stdout


def test_a_sweep_of_a_one_class_cohort_is_refused_before_its_study_or_any_run_exists(tmp_path, celeba_manifest):
    manifest = _one_class(celeba_manifest, tmp_path / "patients.csv")
    (tmp_path / "study.yaml").write_text(f"name: thin\nkind: sweep\nbase: {{data: {manifest}, epochs: 1, "
                                         "pretrained: false, img_size: 32}\nconfigurations:\n  - {model: resnet18}\n")
    work = tmp_path / "work"
    r = _cushing(work, "sweep", str(tmp_path / "study.yaml"))
    assert r.returncode == 2, r.stderr[-2000:]
    assert "the cohort has 40 patients and 0 controls" in r.stderr
    assert list(work.iterdir()) == [], "no Optuna storage, no parent run"


def test_promote_never_crowns_a_run_whose_validation_metric_is_not_estimable(tmp_path):
    """Runs a store may hold from before the check (or another tool): validation of one class, or no val/f1."""
    import math

    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    c = mlflow.MlflowClient(uri)
    exp = c.create_experiment("cushing")
    for name, metrics in (("all-patients", {"val/f1": 1.0, "val/n": 13, "val/positives": 13}),
                          ("no-f1", {"val/f1": math.nan, "val/n": 30, "val/positives": 6})):
        run = c.create_run(exp, run_name=name, tags={"model_uri": "models:/m-none", "model": "resnet18"})
        for k, v in metrics.items():
            c.log_metric(run.info.run_id, k, v)
        c.set_terminated(run.info.run_id)
    r = _cushing(tmp_path, "promote", "--experiment", "cushing")
    assert r.returncode == 1, r.stdout + r.stderr
    assert "val/f1 not estimable: validation has 13 patients, 0 controls" in r.stdout
    assert "val/f1 missing or not estimable" in r.stdout
    assert "no eligible run" in r.stdout and not c.search_registered_models()
    assert r.stdout.count("'cushing'") == 1, "the experiment is named once"


def test_training_from_a_raw_manifest_leaves_out_unreadable_photos_only_when_told(tmp_path, demo_manifest):
    df = pd.read_csv(demo_manifest)
    df["image"] = [str(demo_manifest.parent / p) for p in df["image"]]
    lost = pd.DataFrame({"image": [str(tmp_path / "typo.jpg"), str(tmp_path / "half.jpg")], "label": [1, 0],
                         "sex": ["F", "M"], "subject_id": ["lost1", "lost2"], "split": ["train", "val"],
                         "synthetic": 1})  # still the demo cohort: no face-recognition audit of drawn faces
    raw = open(df["image"].iloc[0], "rb").read()
    (tmp_path / "half.jpg").write_bytes(raw[: len(raw) * 2 // 3])  # opens fine; the data ends early
    pd.concat([df, lost], ignore_index=True).to_csv(tmp_path / "manifest.csv", index=False)
    args = ["train", "--data", str(tmp_path / "manifest.csv"), *TINY, "--bootstrap", "0", "--cam", "false",
            "--log-model", "false"]
    r = _cushing(tmp_path / "refused", *args)
    assert r.returncode == 2 and f"line {len(df) + 2}: " in r.stderr and "typo.jpg: file not found" in r.stderr
    assert f"line {len(df) + 3}: " in r.stderr and "truncated" in r.stderr
    assert "2 photos cannot be found or read: --skip-bad-photos true leaves them out" in r.stderr
    assert list((tmp_path / "refused").iterdir()) == []
    r = _cushing(tmp_path / "skipped", *args, "--skip-bad-photos", "true")
    assert r.returncode == 0, r.stderr[-3000:]
    import mlflow

    c = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'skipped' / 'mlflow.db'}")
    (run,) = c.search_runs([c.get_experiment_by_name("cushing").experiment_id])
    m = run.data.metrics
    assert {k: m[f"skipped_photos{k}"] for k in ("", "/patient", "/control", "/female", "/male")} == \
        {"": 2, "/patient": 1, "/control": 1, "/female": 1, "/male": 1}
    assert m["val/n"] + m["test/n"] == len(df) - (df["split"] == "train").sum(), "the kept photos, all of them"


def test_a_failure_after_validation_ends_the_run_failed_with_its_reason(tmp_path, demo_manifest):
    import mlflow

    r = _cushing(tmp_path, "train", "--model", "resnet18", "--epochs", "1", "--img-size", "32", "--weights",
                 str(tmp_path / "nope.safetensors"), "--cam", "false")
    assert r.returncode == 2, r.stderr[-2000:]
    c = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = c.search_runs([c.get_experiment_by_name("cushing").experiment_id])
    assert run.info.status == "FAILED"
    reason = run.data.tags["cushing.error"]
    assert reason.startswith("WeightsUnavailable: pretrained weights for resnet18") and "\n" not in reason
