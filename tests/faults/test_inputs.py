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


def _run_faces(tmp_path, manifest) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cushing", "faces", "--manifest", str(manifest), "--out",
                           str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache"), "--workers", "1"],
                          cwd=tmp_path, env=_env(tmp_path), capture_output=True, text=True, timeout=300)


def _faces_run(tmp_path):
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    c = mlflow.MlflowClient()
    (run,) = c.search_runs([c.get_experiment_by_name("cushing").experiment_id])
    return run


def test_faces_with_no_usable_photo_says_so_and_logs_its_audit(tmp_path):
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "text.jpg").write_bytes(b"not a photo\n" * 30)
    pd.DataFrame({"image": ["empty.jpg", "text.jpg", "missing.jpg"], "label": [0, 1, 0], "sex": ["F", "M", "F"]}
                 ).to_csv(tmp_path / "photos.csv", index=False)
    r = _run_faces(tmp_path, tmp_path / "photos.csv")
    assert r.returncode == 3 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert "cushing faces: no face could be extracted" in r.stderr
    assert list(pd.read_csv(tmp_path / "out" / "manifest.csv").columns)[:3] == ["image", "label", "sex"]
    report = pd.read_csv(tmp_path / "out" / "faces_report.csv")
    assert sorted(report["reason"]) == ["empty_file", "file_not_found", "not_an_image"]
    run = _faces_run(tmp_path)
    assert run.info.status == "FINISHED" and run.data.metrics["faces/extracted"] == 0


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
