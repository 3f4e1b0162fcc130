"""The synthetic demo cohort: Table I counts, marked synthetic, label visible in the drawn faces."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pandas as pd
from PIL import Image

from cushing.data.demo import TABLE_I
from cushing.data.manifest import load_manifest


def test_demo_cohort_has_table_one_counts_and_is_marked(demo_manifest):
    df = pd.read_csv(demo_manifest)
    assert len(df) == 343 and df["subject_id"].nunique() == 343 and df["label"].sum() == 49
    counts = df.groupby(["split", "sex", "label"]).size().to_dict()
    assert counts == TABLE_I
    assert (df["synthetic"] == 1).all()
    assert load_manifest(demo_manifest).synthetic
    assert (demo_manifest.parent / "SYNTHETIC.txt").exists()


def test_label_changes_roundness_and_redness(demo_manifest):
    df = pd.read_csv(demo_manifest)
    pos, neg = df[df["label"] == 1], df[df["label"] == 0]
    assert pos["roundness"].mean() > neg["roundness"].mean() + 0.07
    assert pos["redness"].mean() > neg["redness"].mean() + 0.25
    # and it is in the pixels: the cheeks of patients are redder (R - G) than those of controls
    def cheek_red(path):
        a = np.asarray(Image.open(demo_manifest.parent / path), dtype=float)
        region = a[120:150, 60:164]
        return (region[..., 0] - region[..., 1]).mean()
    assert np.mean([cheek_red(p) for p in pos["image"][:20]]) > np.mean([cheek_red(p) for p in neg["image"][:20]])


def test_cli_demo_data(tmp_path):
    r = subprocess.run([sys.executable, "-m", "cushing", "demo-data", str(tmp_path / "d"), "--size", "96"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    df = pd.read_csv(tmp_path / "d" / "manifest.csv")
    assert len(df) == 343
    assert Image.open(tmp_path / "d" / df["image"][0]).size == (96, 96)
    r = subprocess.run([sys.executable, "-m", "cushing", "demo-data", str(tmp_path / "d")], capture_output=True, text=True)
    assert r.returncode == 1 and "not overwriting" in r.stderr
