"""A model logged before the package moved into subpackages (commit f18d126, the flat layout) still loads and
scores with today's code: logged models are models from code whose entry points, cushing.release.model_code and
cushing.release.pyfunc, keep their module paths, and whose configuration format did not change."""
from __future__ import annotations

import io
import os
import subprocess
import sys
import tarfile

import pandas as pd
import pytest

from tests.conftest import ROOT, env_vars

pytestmark = pytest.mark.slow

BEFORE_THE_MOVE = "f18d126"  # the last commit with the flat cushing/ layout


@pytest.fixture(scope="module")
def old_model(tmp_path_factory, demo_manifest):
    """Train and log a tiny model with the package as it was at BEFORE_THE_MOVE (from git history)."""
    d = tmp_path_factory.mktemp("old-package")
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", BEFORE_THE_MOVE, "cushing"], capture_output=True,
                             check=True).stdout
    tarfile.open(fileobj=io.BytesIO(archive)).extractall(d / "old", filter="data")
    assert (d / "old" / "cushing" / "experiment.py").exists(), "the old layout: modules flat in cushing/"
    uri = f"sqlite:///{d / 'mlflow.db'}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PYTHONPATH": str(d / "old")}
    env.pop("MLFLOW_RUN_ID", None)
    r = subprocess.run([sys.executable, "-m", "cushing", "train", "--model", "resnet18", "--pretrained", "false",
                        "--epochs", "1", "--img-size", "32", "--bootstrap", "0", "--cam", "false",
                        "--experiment", "old"], cwd=d, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    model_uri = r.stdout.split("model: ")[1].split()[0]
    return uri, model_uri


def test_a_model_logged_before_the_move_loads_and_scores_with_todays_code(old_model):
    import mlflow

    import cushing.model.train  # today's package is imported first, as in `cushing evaluate` or a notebook
    from cushing.data.demo import synthetic_jpeg_b64

    uri, model_uri = old_model
    with env_vars({"MLFLOW_TRACKING_URI": uri, "MLFLOW_ALLOW_PICKLE_DESERIALIZATION": "false"}):
        model = mlflow.pyfunc.load_model(model_uri)
        out = model.predict(pd.DataFrame({"image": [synthetic_jpeg_b64(seed=s) for s in range(4)]}))
        threshold = float(model.metadata.metadata["cushing"]["threshold"])
    assert cushing.model.train.__file__.startswith(str(ROOT)), "today's code did the scoring"
    assert list(out.columns) == ["probability", "label", "face_status", "operating_point"]
    p = out["probability"].astype(float)
    assert ((p > 0) & (p < 1)).all() and (out["label"] == (p >= threshold).astype(int)).all()
