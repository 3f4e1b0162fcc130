"""The face stage: real dlib on real faces (../shared), bad photos with exact reason codes, cache, SAM code path
with a tiny random SAM saved to a checkpoint, the MLflow audit, and training + serving on the face crops."""
from __future__ import annotations

import base64
import io
import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cushing.faces.pipeline import extract_faces
from cushing.faces.settings import FaceSettings

pytestmark = [pytest.mark.dlib, pytest.mark.slow]


@pytest.fixture(scope="module")
def photos(celeba_manifest, tmp_path_factory):
    """80 real photos (one sex per subject, the contract), label = sex so a small model has a signal."""
    df = celeba_manifest.copy()
    df["sex"] = df["subject_id"].map(df.groupby("subject_id")["sex"].agg(lambda s: s.mode()[0]))
    df = df.drop_duplicates("subject_id").head(80).copy()
    df["label"] = (df["sex"] == "M").astype(int)
    path = tmp_path_factory.mktemp("photos") / "manifest.csv"
    df[["image", "label", "sex", "subject_id"]].to_csv(path, index=False)
    return path


@pytest.fixture(scope="module")
def extracted(photos, tmp_path_factory):
    d = tmp_path_factory.mktemp("faces")
    out = extract_faces(photos, d / "out", FaceSettings(), cache_dir=d / "cache", progress=False,
                        skip_bad_photos=True)  # a few of these photos have no face HOG finds
    return out, d


def test_real_faces_detected_aligned_and_masked(extracted):
    out, _ = extracted
    rate = out.extracted / len(out.report)
    assert rate >= 0.85, f"detection rate {rate:.2f} on 89x109 CelebA photos"
    fm = pd.read_csv(out.manifest)
    assert (fm["face_upsample"] >= 1).mean() > 0.8, "small faces need the upsampling path"
    assert (fm["face_mask_source"] == "landmark_hull").all() and fm["face_mask_score"].isna().all()
    for _, r in fm.head(20).iterrows():
        img = np.asarray(Image.open(out.manifest.parent / r["image"]))
        assert img.shape == (224, 224, 3)
        assert (img[0, 0] == 255).all() and (img[-1, -1] == 255).all(), "background is white"
        lm = np.asarray(json.loads(r["face_landmarks"]))
        left, right = lm[36:42].mean(0), lm[42:48].mean(0)
        assert abs(left[1] - right[1]) < 1.5, "eyes are level after alignment"
        assert lm[19, 1] < lm[30, 1] < lm[8, 1], "brows above the nose above the chin"
    assert set(out.report["status"]) <= {"ok", "rejected"} and len(out.report) == 80
    assert (out.report.loc[out.report["status"] != "ok", "reason"] == "no_face").all()


def test_rerun_hits_the_cache_and_loads_no_model(photos, extracted, monkeypatch):
    out, d = extracted
    import cushing.faces.pipeline as faces

    def forbidden(*a, **k):
        raise AssertionError("a model was loaded on a fully cached rerun")
    monkeypatch.setattr(faces, "_Dlib", forbidden)
    monkeypatch.setattr(faces, "ProcessPoolExecutor", forbidden)
    again = extract_faces(photos, d / "again", FaceSettings(), cache_dir=d / "cache", progress=False,
                          skip_bad_photos=True)
    assert again.processed == 0 and again.cached == 80 and again.extracted == out.extracted
    a, b = pd.read_csv(out.manifest), pd.read_csv(again.manifest)
    assert (a["image"] == b["image"]).all()


def test_partial_runs_resume(photos, tmp_path):
    df = pd.read_csv(photos)
    half = tmp_path / "half.csv"
    df.head(30).to_csv(half, index=False)
    first = extract_faces(half, tmp_path / "a", FaceSettings(), cache_dir=tmp_path / "c", workers=1, progress=False,
                          skip_bad_photos=True)
    assert first.processed == 30
    full = extract_faces(photos, tmp_path / "b", FaceSettings(), cache_dir=tmp_path / "c", workers=1, progress=False,
                         skip_bad_photos=True)
    assert full.cached == 30 and full.processed == 50


# ------------------------------------------------------------------------------------------------ bad photos

def test_bad_photos_get_exact_reason_codes_and_nothing_is_lost(bad_set, tmp_path):
    d, expect = bad_set
    out = extract_faces(d / "manifest.csv", tmp_path / "out", FaceSettings(), cache_dir=tmp_path / "c",
                        progress=False, skip_bad_photos=True)
    rep = out.report.set_index("image")
    assert len(rep) == len(expect), "every input photo is in the report"
    for name, reason in expect.items():
        got = rep.loc[name, "reason"] or "ok"
        assert got == reason, f"{name}: expected {reason}, got {got} ({rep.loc[name, 'detail']})"
    fm = pd.read_csv(out.manifest)
    assert len(fm) == sum(r == "ok" for r in expect.values()), "zero good photos lost"
    assert all(rep.loc[n, "detail"] for n, r in expect.items() if r != "ok"), "rejections say why"


# ------------------------------------------------------------------------------------------------ SAM

@pytest.fixture(scope="module")
def tiny_sam(tmp_path_factory):
    """A small, randomly initialised SAM saved as a checkpoint file (real SAM weights are not available here)."""
    import torch
    from cushing.faces.sam import build_sam

    torch.manual_seed(0)
    sam = build_sam(encoder_embed_dim=64, encoder_depth=2, encoder_num_heads=2, encoder_global_attn_indexes=[1])
    path = tmp_path_factory.mktemp("sam") / "sam_tiny.pth"
    torch.save(sam.state_dict(), path)
    return path


def test_sam_checkpoint_path_end_to_end(tiny_sam, photos, tmp_path):
    from cushing.cli import main
    from cushing.faces.sam import infer_model_type, load_sam

    assert infer_model_type(tiny_sam) == "custom"
    with pytest.raises(ValueError, match="weights are custom"):
        load_sam(tiny_sam, "vit_h")
    df = pd.read_csv(photos).head(8)
    small = tmp_path / "m.csv"
    df.to_csv(small, index=False)
    rc = main(["faces", "--manifest", str(small), "--out", str(tmp_path / "out"), "--sam-checkpoint", str(tiny_sam),
               "--cache-dir", str(tmp_path / "c"), "--workers", "1", "--no-track", "--skip-bad-photos", "true"])
    assert rc == 0
    fm = pd.read_csv(tmp_path / "out" / "manifest.csv")
    assert len(fm) >= 4 and (fm["face_mask_source"] == "sam").all()
    assert np.isfinite(fm["face_mask_score"]).all()
    settings = json.loads((tmp_path / "out" / "faces_settings.json").read_text())
    assert settings["mask_method"] == "sam" and len(settings["weights"]["sam"]) == 64
    rep = pd.read_csv(tmp_path / "out" / "faces_report.csv")
    assert set(rep["reason"].fillna("")) <= {"", "no_face", "empty_mask"}


def test_no_checkpoint_means_landmark_hull_and_is_recorded(extracted):
    out, _ = extracted
    settings = json.loads((out.manifest.parent / "faces_settings.json").read_text())
    assert settings["mask_method"] == "landmark_hull" and settings["sam_checkpoint"] is None


# ------------------------------------------------------------------------------------------------ MLflow + training

def test_audit_logged_without_phi(photos, tracking, tmp_path):
    import mlflow

    from cushing.faces.run import run_faces
    from cushing.data.manifest import load_manifest

    res = run_faces(manifest=str(photos), out=str(tmp_path / "out"), settings=FaceSettings(),
                    cache_dir=str(tmp_path / "c"), experiment="faces-audit", progress=False, skip_bad_photos=True)
    run = mlflow.MlflowClient().get_run(res.run_id)
    m = run.data.metrics
    assert m["faces/photos"] == 80 and m["faces/extracted"] == res.outcome.extracted
    for g in ("female/control", "male/patient"):
        assert f"faces/failure_rate/{g}" in m and f"faces/mask_area_mean/{g}" in m
    assert m["faces/mask_landmark_hull"] == res.outcome.extracted
    assert run.data.tags["face_mask_method"] == "landmark_hull"
    names = {a.path for a in mlflow.MlflowClient().list_artifacts(res.run_id)}
    assert {"faces_audit.csv", "faces_report_hashed.csv", "plots"} <= names
    plots = {a.path for a in mlflow.MlflowClient().list_artifacts(res.run_id, "plots")}
    assert plots == {"plots/faces_audit.png"}, "no montages unless allow_phi_artifacts"
    rep = pd.read_csv(mlflow.artifacts.download_artifacts(run_id=res.run_id, artifact_path="faces_report_hashed.csv"))
    assert list(rep.columns) == ["subject", "sex", "label", "status", "reason"]
    text = rep.to_csv()
    assert ".jpg" not in text and "celeba_" not in text
    digest = load_manifest(res.outcome.manifest).digest
    assert run.inputs.dataset_inputs[0].dataset.digest == digest[:36]


def test_train_on_face_crops_and_serve_raw_photos(extracted, tracking, celeba_dir):
    import mlflow

    from cushing.config import TrainConfig
    from cushing.workflows.experiment import run_single

    out, _ = extracted
    cfg = TrainConfig(data=str(out.manifest), model="resnet18", pretrained=False, epochs=1, img_size=64,
                      bootstrap=0, experiment="faces-train", min_positives=1,
                      allow_one_class_subgroups=True)  # label = sex: each sex is one class
    s = run_single(cfg, progress=False)
    run = mlflow.MlflowClient().get_run(s.run_id)
    assert run.data.tags["face_mask_source"] == "landmark_hull"
    assert run.data.tags["cam_region_source"] == "dlib_landmarks"
    model = mlflow.pyfunc.load_model(s.model_uri)
    from pathlib import Path

    raw = [Path(p) for p in out.report.loc[out.report["status"] == "ok", "path"].head(3)]
    blank = io.BytesIO()
    Image.new("RGB", (200, 200), (120, 160, 200)).save(blank, "JPEG")
    payload = [base64.b64encode(p.read_bytes()).decode() for p in raw] + [base64.b64encode(blank.getvalue()).decode()]
    res = model.predict(pd.DataFrame({"image": payload}))
    assert (res["face_status"].iloc[:3] == "ok").all(), "serving finds the faces the stage found"
    assert res["face_status"].iloc[3] == "no_face"
    assert res["probability"].iloc[3] is None and res["label"].iloc[3] == -1  # JSON null when served
    ok = res[res["face_status"] == "ok"]
    assert ((ok["probability"] >= 0) & (ok["probability"] <= 1)).all()


def test_bench_faces_reports_cold_and_warm(photos, tmp_path):
    from cushing.workflows.bench import bench_faces

    res = bench_faces(manifest=str(photos), limit=20, sam_checkpoint=None, out=str(tmp_path / "faces.json"))
    saved = json.loads((tmp_path / "faces.json").read_text())
    assert saved["photos"] == 20 and saved["warm_processed"] == 0
    assert saved["cold_photos_per_s"] > 0 and saved["warm_s"] < saved["cold_s"]
    assert res["mask"] == "landmark_hull"
