"""Manifest validation: every problem listed at once, with its line; nothing written."""
from __future__ import annotations

import subprocess
import sys

import pandas as pd
import pytest

from cushing.data.manifest import ManifestError, load_manifest
from tests.conftest import copy_demo_images


@pytest.fixture()
def photos(tmp_path, demo_manifest):
    return copy_demo_images(demo_manifest, tmp_path / "photos", 6)


def _write(tmp_path, rows, columns=("image", "label", "sex", "subject_id")):
    path = tmp_path / "manifest.csv"
    pd.DataFrame(rows, columns=list(columns)).to_csv(path, index=False)
    return path


def test_valid_manifest_loads_with_defaults(tmp_path, photos):
    path = _write(tmp_path, [[f"photos/{p.name}", i % 2, "F", ""] for i, p in enumerate(photos)])
    m = load_manifest(path)
    assert list(m.table["subject_id"]) == [p.stem for p in photos]  # defaults to the image stem
    assert m.table["path"].map(lambda s: s.startswith(str(tmp_path))).all()
    assert len(m.digest) == 64 and not m.synthetic


def test_every_problem_is_listed_at_once(tmp_path, photos):
    (tmp_path / "photos" / "broken.jpg").write_bytes(b"this is not a jpeg")
    rows = [
        [f"photos/{photos[0].name}", 0, "F", "a"],
        [f"photos/{photos[1].name}", 2, "F", "b"],        # line 3: bad label
        [f"photos/{photos[2].name}", 1, "X", "c"],        # line 4: bad sex
        ["photos/missing.jpg", 0, "M", "d"],              # line 5: missing file
        [f"photos/{photos[0].name}", 1, "F", "e"],        # line 6: duplicate of line 2
        [f"photos/{photos[3].name}", 0, "M", "a"],        # line 7: subject a with two sexes
        ["photos/broken.jpg", 0, "F", "f"],               # line 8: unreadable image
    ]
    path = _write(tmp_path, rows)
    with pytest.raises(ManifestError) as e:
        load_manifest(path)
    text = str(e.value)
    assert "line 3: label must be 0 or 1" in text
    assert "line 4: sex must be F or M" in text
    assert "line 5: photos/missing.jpg: file not found" in text
    assert "lines 2, 6: duplicate images" in text
    assert "subject 'a' has two sexes" in text
    assert "line 8: photos/broken.jpg: not a readable image" in text
    assert len(e.value.problems) >= 6


def test_a_subject_that_is_both_patient_and_control_is_refused(tmp_path, photos):
    """Given as one subject_id, or made one by folders numbered per class (patients/000.jpg, controls/000.jpg)
    when subject_id is left out: the error names the lines, and for the second says how to fix it."""
    path = _write(tmp_path, [[f"photos/{photos[0].name}", 1, "F", "a"], [f"photos/{photos[1].name}", 0, "F", "a"],
                             [f"photos/{photos[2].name}", 0, "F", "b"]])
    with pytest.raises(ManifestError) as e:
        load_manifest(path)
    assert e.value.problems == ["lines 2, 3: subject 'a' is both a patient and a control (labels 1 and 0)"]
    for i, cls in enumerate(("patients", "controls")):
        (tmp_path / cls).mkdir()
        (tmp_path / cls / "000.jpg").write_bytes(photos[2 + i].read_bytes())
    path = _write(tmp_path, [["patients/000.jpg", 1, "M", ""], ["controls/000.jpg", 0, "M", ""]])
    with pytest.raises(ManifestError) as e:
        load_manifest(path)
    assert e.value.problems == ["lines 2, 3: subject '000' is both a patient and a control (labels 1 and 0) (the "
                                "file name's stem stands in for a missing subject_id: give each person's subject_id)"]


def test_missing_columns_and_bad_split(tmp_path, photos):
    path = tmp_path / "m.csv"
    pd.DataFrame({"image": [photos[0].name], "sex": ["F"]}).to_csv(path, index=False)
    with pytest.raises(ManifestError, match="missing column"):
        load_manifest(path)
    path = _write(tmp_path, [[f"photos/{photos[0].name}", 0, "F", "a", "train"],
                             [f"photos/{photos[1].name}", 0, "F", "a", "test"],
                             [f"photos/{photos[2].name}", 1, "M", "b", "holdout"]],
                  columns=("image", "label", "sex", "subject_id", "split"))
    with pytest.raises(ManifestError) as e:
        load_manifest(path)
    assert "split must be train, val or test" in str(e.value)
    assert "subject 'a' is in more than one split (leakage)" in str(e.value)


def test_cli_rejects_bad_manifest_and_writes_nothing(tmp_path, photos):
    path = _write(tmp_path, [[f"photos/{photos[0].name}", 7, "F", "a"]])
    work = tmp_path / "work"
    work.mkdir()
    r = subprocess.run([sys.executable, "-m", "cushing", "train", "--data", str(path), "--pretrained", "false"],
                       cwd=work, capture_output=True, text=True, env=_env(work))
    assert r.returncode == 2
    assert "line 2: label must be 0 or 1" in r.stderr and str(path) in r.stderr
    assert list(work.iterdir()) == []  # no mlflow.db, no mlruns


def _env(work):
    import os

    env = dict(os.environ)
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def test_hashed_subject_ids_are_not_keyed_by_anything_logged(tmp_path, photos):
    """The manifest digest is logged (run tag, model metadata, card); the subject hashes must not be keyed by it,
    or anyone reading MLflow could hash a list of candidate ids and match them."""
    from cushing.data.manifest import hash_subject

    path = _write(tmp_path, [[f"photos/{p.name}", i % 2, "F", f"P{i:03d}"] for i, p in enumerate(photos)])
    m = load_manifest(path)
    hashes = set(m.subject_hashes())
    dictionary = [f"P{i:03d}" for i in range(1000)]
    for logged in (m.digest, m.digest[:12], ""):
        assert not hashes & {hash_subject(s, logged) for s in dictionary}
    assert set(load_manifest(path).subject_hashes()) == hashes  # stable: runs of one cohort join on them
    photos[0].write_bytes(photos[0].read_bytes() + b"\0")  # other bytes, other key
    assert not set(load_manifest(path).subject_hashes()) & hashes
