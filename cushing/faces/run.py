"""The face stage as a tracked step: extract, then log a PHI-safe quality audit to MLflow.

The audit has detection failure rates, mask sources and mask area/score summaries by sex x label (preprocessing can
itself be biased by sex), and the face-crop manifest's digest as the run's dataset. No face pixels and no file
names reach MLflow unless allow_phi_artifacts is set (then a montage of crops and failures, named by hashed ids).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from cushing import tracking
from cushing.faces.pipeline import FacesOutcome, extract_faces
from cushing.faces.settings import FaceSettings
from cushing.data.imageio import BadImage, open_rgb
from cushing.data.manifest import hash_subject, load_manifest, skipped_counts
from cushing.stats.plots import pyplot

__all__ = ["run_faces", "audit_table"]


def audit_table(report: pd.DataFrame, manifest: pd.DataFrame) -> pd.DataFrame:
    """Per sex x label: photos, rejected, failure rate, mask sources, mask area and score summaries."""
    ok, rows = manifest, []
    groups = [("all", report, ok)] + [
        (f"{'female' if s == 'F' else 'male'}/{'patient' if lab == 1 else 'control'}",
         report[(report["sex"] == s) & (report["label"] == lab)], ok[(ok["sex"] == s) & (ok["label"] == lab)])
        for s in ("F", "M") for lab in (0, 1)]
    for name, rep, good in groups:
        n = len(rep)
        rejected = int((rep["status"] != "ok").sum())
        row = {"group": name, "photos": n, "extracted": n - rejected, "rejected": rejected,
               "failure_rate": rejected / n if n else float("nan")}
        for src in ("sam", "landmark_hull", "none"):
            row[f"mask_{src}"] = int((good.get("face_mask_source", pd.Series(dtype=str)) == src).sum())
        for col in ("face_mask_area", "face_mask_score"):
            v = pd.to_numeric(good.get(col, pd.Series(dtype=float)), errors="coerce").dropna()
            row[f"{col[5:]}_mean"] = float(v.mean()) if len(v) else float("nan")
            row[f"{col[5:]}_sd"] = float(v.std(ddof=1)) if len(v) > 1 else float("nan")
        for reason, cnt in rep.loc[rep["status"] != "ok", "reason"].value_counts().items():
            row[f"reason_{reason}"] = int(cnt)
        rows.append(row)
    return pd.DataFrame(rows).fillna({c: 0 for c in pd.DataFrame(rows).columns if c.startswith("reason_")})


def _audit_metrics(audit: pd.DataFrame) -> dict[str, float]:
    m = {}
    for _, r in audit.iterrows():
        suffix = "" if r["group"] == "all" else f"/{r['group']}"
        m[f"faces/failure_rate{suffix}"] = r["failure_rate"]
        m[f"faces/mask_area_mean{suffix}"] = r["mask_area_mean"]
        if np.isfinite(r["mask_score_mean"]):
            m[f"faces/mask_score_mean{suffix}"] = r["mask_score_mean"]
        if r["group"] == "all":
            m.update({"faces/photos": r["photos"], "faces/extracted": r["extracted"], "faces/rejected": r["rejected"],
                      **{f"faces/{k}": float(v) for k, v in r.items() if str(k).startswith(("reason_", "mask_"))
                         and not str(k).startswith(("mask_area", "mask_score"))}})
    return m


def _audit_plot(audit: pd.DataFrame, path: Path) -> None:
    plt = pyplot()
    a = audit[audit["group"] != "all"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.4))
    ax1.bar(a["group"], a["failure_rate"], color="C3")
    ax1.set(title="detection / extraction failure rate", ylim=(0, max(0.05, float(a["failure_rate"].max()) * 1.2)))
    ax2.bar(a["group"], a["mask_area_mean"], yerr=a["mask_area_sd"].fillna(0), color="C0")
    ax2.set(title="mask area (share of the aligned crop)", ylim=(0, 1))
    for ax in (ax1, ax2):
        ax.tick_params(axis="x", rotation=30, labelsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _montage(paths: list[Path], names: list[str], path: Path, title: str) -> None:
    from PIL import Image, ImageDraw

    tiles = [Image.open(p).convert("RGB").resize((112, 112)) for p in paths[:48]]
    if not tiles:
        return
    cols = 8
    canvas = Image.new("RGB", (cols * 112, ((len(tiles) + cols - 1) // cols) * 124 + 16), "white")
    d = ImageDraw.Draw(canvas)
    d.text((4, 2), title, fill="black")
    for k, (t, n) in enumerate(zip(tiles, names)):
        x, y = (k % cols) * 112, 16 + (k // cols) * 124
        canvas.paste(t, (x, y))
        d.text((x + 2, y + 112), n[:16], fill="black")
    canvas.save(path)


@dataclass
class FacesRun:
    outcome: FacesOutcome
    run_id: str | None
    audit: pd.DataFrame


def run_faces(*, manifest: str, out: str, settings: FaceSettings, cache_dir: str | None = None, workers: int = 0,
              experiment: str = "cushing", allow_phi: bool = False, track: bool = True,
              progress: bool = True, skip_bad_photos: bool = False) -> FacesRun:
    outcome = extract_faces(manifest, out, settings, cache_dir=cache_dir, workers=workers, progress=progress,
                            skip_bad_photos=skip_bad_photos)
    crops = pd.read_csv(outcome.manifest)
    audit = audit_table(outcome.report, crops)
    if not track:
        return FacesRun(outcome, None, audit)
    tags = {"task": "faces", "face_mask_method": settings.mask_method, "face_detector": settings.detector,
            "allow_phi_artifacts": str(allow_phi).lower()}
    with tracking.start_run(experiment=experiment, run_name=f"faces-{settings.mask_method}", tags=tags) as run:
        run.log_params({k: v for k, v in settings.to_dict().items() if k != "sam_checkpoint"} |
                       {"sam_checkpoint": Path(settings.sam_checkpoint).name if settings.sam_checkpoint else ""})
        run.log_metrics({**_audit_metrics(audit), **skipped_counts(outcome.skipped), "faces/seconds": outcome.seconds,
                         "faces/cached": float(outcome.cached), "faces/processed": float(outcome.processed)})
        run.log_table(audit, "faces_audit.csv")
        rep, key = outcome.report, outcome.subject_key  # the report without file names
        run.log_table(pd.DataFrame({"subject": [hash_subject(s, key) for s in rep["subject_id"]], "sex": rep["sex"],
                                    "label": rep["label"], "status": rep["status"], "reason": rep["reason"]}),
                      "faces_report_hashed.csv")
        with tracking.artifact_dir() as d:
            _audit_plot(audit, d / "faces_audit.png")
            if allow_phi:
                _phi_montages(outcome, crops, d)
            run.log_files(d, "plots")
        if len(crops):
            fm = load_manifest(outcome.manifest)
            ds = pd.DataFrame({"subject": fm.subject_hashes(), "sex": fm.table["sex"], "label": fm.table["label"]})
            run.log_dataset(ds, digest=fm.digest, name="face-crops", context="face-extraction")
            run.set_tags({"face_crop_digest": fm.digest})
        return FacesRun(outcome, run.run_id, audit)


def _phi_montages(outcome: FacesOutcome, crops: pd.DataFrame, d: Path) -> None:
    key, base = outcome.subject_key, outcome.manifest.parent
    _montage([base / p for p in crops["image"]], [hash_subject(s, key) for s in crops["subject_id"]],
             d / "crops_montage.png", "face crops (allow_phi_artifacts=true)")
    failed = outcome.report[outcome.report["status"] != "ok"]
    readable = [r for _, r in failed.iterrows() if _thumb_ok(Path(r["path"]))]
    _montage([Path(r["path"]) for r in readable], [r["reason"] for r in readable], d / "failures_montage.png",
             "rejected photos (allow_phi_artifacts=true)")


def _thumb_ok(p: Path) -> bool:
    try:
        open_rgb(p, max_pixels=40_000_000, draft=256)
        return True
    except BadImage:
        return False
