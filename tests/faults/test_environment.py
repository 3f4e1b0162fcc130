"""Where the project meets the machine: two clones sharing the venv, and a tracking server that is down."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from cushing.ops.stack import free_port
from tests.conftest import ROOT

pytestmark = pytest.mark.faults


def test_sourcing_env_sh_makes_that_clone_the_one_python_imports(tmp_path):
    for name in ("a", "b"):
        subprocess.run(["git", "clone", "-q", str(ROOT), str(tmp_path / name)], check=True)
    env = {**os.environ, "CUSHING_SKIP_APT": "1", "CUSHING_VENV": os.environ.get("VIRTUAL_ENV", sys.prefix)}
    env.pop("PYTHONPATH", None)

    def imported(*order: str) -> str:
        sources = " && ".join(f"source {tmp_path / c}/scripts/env.sh >/dev/null 2>&1" for c in order)
        script = (f"{sources} && cd {tmp_path} && python -c 'import cushing; print(cushing.__file__)' && "
                  "cushing --version")
        r = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-2000:]
        return r.stdout
    assert imported("a", "b").startswith(str(tmp_path / "b" / "cushing"))
    assert imported("b", "a").startswith(str(tmp_path / "a" / "cushing")), "the last sourced clone wins, not the " \
        "last installed"
    assert "cushing 0.1.0" in imported("a")


def test_an_unreachable_tracking_server_fails_fast_naming_it(tmp_path):
    port = free_port()  # nothing listens here
    uri = f"http://127.0.0.1:{port}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    env.pop("MLFLOW_RUN_ID", None)
    t0 = time.time()
    r = subprocess.run([sys.executable, "-m", "cushing", "train", "--model", "resnet18", "--pretrained", "false",
                        "--epochs", "1"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    took = time.time() - t0
    assert r.returncode == 2 and took < 30, (took, r.stderr[-1500:])
    assert f"the MLflow tracking server at {uri} is not reachable" in r.stderr and "Traceback" not in r.stderr
    assert "decode" not in r.stderr, "it fails before any image is decoded"
