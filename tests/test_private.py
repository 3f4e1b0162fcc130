"""Faces and what is derived from them stay this account's only on a host with other accounts: the face cache, the
crops, the audit's descriptor cache, its pairs and its review page are made private whatever the umask (real dlib on
real CelebA photos; the other account is `nobody`, through runuser, where the tests run as root)."""
from __future__ import annotations

import os
import shutil
import stat
import subprocess
import tempfile
from pathlib import Path

import pytest

from cushing.private import private_dir, write_private

as_root = pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("runuser"),
                             reason="other-account checks run as root (runuser -u nobody)")


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


@pytest.fixture()
def open_umask():
    """The common umask (022), under which new files are readable by every account."""
    old = os.umask(0o022)
    yield
    os.umask(old)


@pytest.fixture()
def shared_folder():
    """A folder every account may enter (tmp_path is inside a 0700 folder: nothing in it would be reachable)."""
    d = Path(tempfile.mkdtemp(prefix="cushing-private-"))
    d.chmod(0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _nobody_reads(path: Path) -> bool:
    return subprocess.run(["runuser", "-u", "nobody", "--", "cat", str(path)], capture_output=True,
                          timeout=30).returncode == 0


def test_a_new_folder_is_private_and_an_existing_one_is_narrowed_only_when_asked(tmp_path, open_umask):
    assert _mode(private_dir(tmp_path / "a" / "b")) == 0o700
    assert _mode(tmp_path / "a") == 0o755  # parents as the umask says
    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o755)
    assert _mode(private_dir(theirs)) == 0o755
    assert _mode(private_dir(theirs, narrow=True)) == 0o700


def test_a_private_file_is_created_0600_and_an_open_one_narrowed(tmp_path, open_umask):
    new = write_private(tmp_path / "new.txt", "é")
    assert _mode(new) == 0o600 and new.read_text(encoding="utf-8") == "é"
    old = tmp_path / "old.txt"
    old.write_text("before")
    assert _mode(old) == 0o644
    write_private(old, "after")
    assert _mode(old) == 0o600 and old.read_text() == "after"


@pytest.mark.dlib
@as_root
def test_crops_descriptors_and_the_review_page_are_out_of_other_accounts_reach(celeba_manifest, shared_folder,
                                                                                 open_umask, tracking):
    from cushing.faces.pipeline import extract_faces
    from cushing.faces.settings import FaceSettings
    from cushing.workflows.cohort_audit import run_audit

    control = shared_folder / "control.txt"
    control.write_text("readable")
    assert _nobody_reads(control), "the other account cannot read even an open file: the check below proves nothing"

    df = celeba_manifest.drop_duplicates("subject_id").head(4).copy()
    manifest = shared_folder / "manifest.csv"
    df[["image", "label", "sex", "subject_id"]].to_csv(manifest, index=False)
    cache = shared_folder / "cache"
    cache.mkdir(mode=0o755)  # a cache left open by an earlier release is narrowed
    faces = extract_faces(manifest, shared_folder / "faces", FaceSettings(), cache_dir=cache / "faces",
                          progress=False, skip_bad_photos=True)
    crops = sorted((shared_folder / "faces" / "crops").iterdir())
    cached = sorted((cache / "faces").rglob("*.png"))
    assert faces.extracted >= 1 and crops and cached
    page = shared_folder / "review.html"
    run_audit(manifest=str(manifest), out=str(shared_folder / "audit"), review=str(page), cache_dir=str(cache / "audit"),
              workers=1, track=False, progress=False)
    descriptors = sorted((cache / "audit").rglob("*.json"))
    assert descriptors

    for folder in (shared_folder / "faces", shared_folder / "faces" / "crops", cache / "faces", cache / "audit",
                   shared_folder / "audit"):
        assert _mode(folder) == 0o700, folder
    assert _mode(page) == 0o600
    for f in (crops[0], cached[0], descriptors[0], shared_folder / "audit" / "audit.csv", page):
        assert not _nobody_reads(f), f
