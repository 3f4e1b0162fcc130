"""Shared fixtures. Tests run on a CPU with no network; real faces are read from ../shared at test time."""
from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]

TEST_ENV = {"HF_HUB_OFFLINE": "1",  # never reach the hub from tests
            "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false", "TQDM_DISABLE": "1",
            "PYTHONWARNINGS": "ignore::UserWarning"}
_SAVED_ENV: dict[str, str | None] = {}


def pytest_configure(config) -> None:
    """The session's environment, set before collection imports anything (huggingface_hub reads its offline flag
    at import) and put back as it was when the session ends."""
    for k, v in TEST_ENV.items():
        _SAVED_ENV[k] = os.environ.get(k)
        os.environ.setdefault(k, v)


def pytest_unconfigure(config) -> None:
    for k, v in _SAVED_ENV.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def _shared_candidates() -> list[Path]:
    env = os.environ.get("CUSHING_SHARED")
    cands = [Path(env)] if env else []
    return cands + [ROOT.parent / "shared", Path("/work/shared")]


def shared_root() -> Path:
    for c in _shared_candidates():
        if (c / "data" / "celeba-chubby" / "manifest.csv").exists():
            return c
    pytest.fail("the shared data folder (../shared/data/celeba-chubby) was not found; set CUSHING_SHARED=/path/to/shared")


@pytest.fixture(scope="session")
def celeba_dir() -> Path:
    return shared_root() / "data" / "celeba-chubby"


@pytest.fixture(scope="session")
def celeba_manifest(celeba_dir) -> pd.DataFrame:
    df = pd.read_csv(celeba_dir / "manifest.csv")
    df["image"] = [str(celeba_dir / p) for p in df["image"]]
    return df


@pytest.fixture(scope="session")
def cushing_home(tmp_path_factory) -> Path:
    """One CUSHING_HOME (demo cohort, caches) for the session, so the demo cohort is drawn once."""
    home = tmp_path_factory.mktemp("cushing-home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CUSHING_HOME", str(home))
        yield home


@pytest.fixture(scope="session")
def demo_manifest(cushing_home) -> Path:
    from cushing.model.train import resolve_data

    return resolve_data("demo")


@pytest.fixture()
def tracking(tmp_path, monkeypatch):
    """A fresh embedded MLflow store for one test; returns its URI."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    import mlflow

    mlflow.set_tracking_uri(uri)
    yield uri
    while mlflow.active_run():
        mlflow.end_run()


@pytest.fixture(scope="session")
def small_demo(tmp_path_factory, demo_manifest) -> Path:
    """The demo cohort with its paper split, as a manifest in a tmp folder (absolute image paths)."""
    d = tmp_path_factory.mktemp("small-demo")
    df = pd.read_csv(demo_manifest)
    df["image"] = [str(demo_manifest.parent / p) for p in df["image"]]
    out = d / "manifest.csv"
    df.to_csv(out, index=False)
    return out


def copy_demo_images(demo_manifest: Path, dst: Path, n: int) -> list[Path]:
    """A few synthetic demo images copied into a test folder (never real faces)."""
    df = pd.read_csv(demo_manifest).head(n)
    dst.mkdir(parents=True, exist_ok=True)
    out = []
    for p in df["image"]:
        target = dst / Path(p).name
        shutil.copy(demo_manifest.parent / p, target)
        out.append(target)
    return out


@pytest.fixture(scope="session")
def pg_stack():
    """One real PostgreSQL + `mlflow server` (basic-auth) on loopback for the whole session."""
    from cushing.ops.stack import LocalStack

    s = LocalStack(workers=1).start()  # one uvicorn worker starts (and restarts) fastest on a small CPU
    yield s
    s.stop()


@contextlib.contextmanager
def env_vars(values: dict):
    """Set environment variables (and MLflow's cached tracking URI) for a block; restore afterwards."""
    import mlflow

    saved = {k: os.environ.get(k) for k in [*values, "MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME"]}
    os.environ.update(values)
    for k in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME"):
        if k not in values:
            os.environ.pop(k, None)
    mlflow.set_tracking_uri(values.get("MLFLOW_TRACKING_URI", mlflow.get_tracking_uri()))
    try:
        yield
    finally:
        while mlflow.active_run():
            mlflow.end_run()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        mlflow.set_tracking_uri(os.environ.get("MLFLOW_TRACKING_URI") or None)


def mlflow_run(work: Path, env: dict, entry: str, *params: str, experiment: str = "cushing",
               timeout: int = 900) -> tuple[str, subprocess.CompletedProcess]:
    """`mlflow run <project> --env-manager local -e ENTRY -P ...` as a user types it; returns (the run id MLflow
    created, the finished process). Fails the test with the output's tail when the run fails."""
    import re

    cmd = ["mlflow", "run", str(ROOT), "--env-manager", "local", "--experiment-name", experiment, "-e", entry]
    for p in params:
        cmd += ["-P", p]
    r = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"mlflow run -e {entry} failed:\n" + r.stdout[-3000:] + r.stderr[-4000:]
    found = re.search(r"Run \(ID '([0-9a-f]+)'\) succeeded", r.stdout + r.stderr)
    assert found, (r.stdout + r.stderr)[-2000:]
    return found.group(1), r


@pytest.fixture(scope="session")
def demo_sweep(tmp_path_factory, cushing_home):
    """The README's demo flow, once, through MLflow's own launcher on an embedded store: `mlflow run -e sweep`
    (projects/demo.yaml, two workers), `-e promote --allow-synthetic` twice (the second changes nothing) and
    `-e dashboard`, all with `''` for their other optional string parameters."""
    d = tmp_path_factory.mktemp("demo-sweep")
    uri = f"sqlite:///{d / 'mlflow.db'}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    for k in ("MLFLOW_RUN_ID", "CUSHING_OPTUNA_STORAGE", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_EXPERIMENT_ID"):
        env.pop(k, None)
    project = str(ROOT / "projects" / "demo.yaml")
    kw = {"experiment": "cushing-demo"}
    sweep_id, sweep = mlflow_run(d, env, "sweep", f"project={project}", "workers=2", "storage=", "compile=", **kw)
    scope = [f"project={project}", "experiment=", "parent_run=", "storage="]
    promote_id, promote = mlflow_run(d, env, "promote", *scope, "allow_synthetic=true", "min_value=",
                                     "max_sex_gap=", **kw)
    again_id, again = mlflow_run(d, env, "promote", *scope, "allow_synthetic=true", **kw)
    dash_id, _ = mlflow_run(d, env, "dashboard", *scope, f"out={d / 'dashboard.html'}", **kw)
    return {"uri": uri, "dir": d, "stdout": sweep.stdout, "storage": f"sqlite:///{d / 'optuna.db'}", "env": env,
            "runs": {"sweep": sweep_id, "promote": promote_id, "promote_again": again_id, "dashboard": dash_id},
            "promote_stdout": promote.stdout + again.stdout}
