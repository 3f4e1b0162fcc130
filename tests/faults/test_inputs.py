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


def test_a_photo_without_a_face_stops_faces_unless_skipped_then_it_is_counted(tmp_path, celeba_manifest):
    """The face stage's own rejections (no face found) stop it too, after extraction but before anything is
    written; with --skip-bad-photos the count is printed at the end and logged per class and sex."""
    import numpy as np

    Image.fromarray(np.tile(np.linspace(0, 255, 300, dtype=np.uint8), (300, 1))).convert("RGB").save(
        tmp_path / "wall.png")  # a photo of a wall: readable, no face
    faces = celeba_manifest.drop_duplicates("subject_id").head(3)
    pd.DataFrame({"image": [*faces["image"], "wall.png"], "label": [0, 0, 0, 1], "sex": ["F", "F", "M", "M"],
                  "subject_id": ["a", "b", "c", "d"]}).to_csv(tmp_path / "photos.csv", index=False)
    r = _run_faces(tmp_path, tmp_path / "photos.csv")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert "1 of 4 photos give no face crop (1 no_face)" in r.stderr and "line 5: wall.png: no_face" in r.stderr
    assert "--skip-bad-photos true" in r.stderr
    assert not (tmp_path / "out").exists() and not (tmp_path / "mlflow.db").exists(), "nothing written, no run"
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
