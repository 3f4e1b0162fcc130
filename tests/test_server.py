"""The production path with real services on loopback: PostgreSQL + `mlflow server` (basic-auth, artifact proxy),
training against it, promotion in the registry, `mlflow models serve` of the champion."""
from __future__ import annotations

import base64
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pandas as pd
import pytest
import requests

from cushing.config import TrainConfig
from cushing.ops.stack import free_port, wait_http

pytestmark = [pytest.mark.slow, pytest.mark.postgres]


# ------------------------------------------------------------------------------------------------ services

@pytest.fixture(scope="module")
def stack(pg_stack, cushing_home):
    from tests.conftest import env_vars

    with env_vars(pg_stack.env()):
        yield pg_stack


def test_auth_required_and_foreign_host_refused(stack):
    url = f"{stack.server.url}/api/2.0/mlflow/experiments/search?max_results=1"
    assert requests.get(url, timeout=10).status_code == 401
    auth = ("admin", stack.admin_password)
    assert requests.get(url, auth=("admin", "wrong-password-123"), timeout=10).status_code == 401
    assert requests.get(url, auth=auth, timeout=10).status_code == 200
    r = requests.get(url, auth=auth, headers={"Host": "evil.example.com"}, timeout=10)
    assert r.status_code in (400, 403)


def _config(small_demo, **kw):
    base = dict(data=str(small_demo), model="resnet18", pretrained=False, epochs=1, img_size=48, bootstrap=100,
                cam=False, experiment="cushing")
    return TrainConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def first_run(stack, small_demo):
    from cushing.workflows.experiment import run_single

    return run_single(_config(small_demo), progress=False)


def _pg_rows(stack, sql, *args):
    import psycopg2

    conn = psycopg2.connect(host="127.0.0.1", port=stack.pg.port, dbname="mlflow", user="mlflow",
                            password=stack.mlflow_db_password)
    try:
        with conn.cursor() as cur:
            cur.execute(sql, args)
            return cur.fetchall()
    finally:
        conn.close()


def _group_commands(pgid: int) -> list[str]:
    from cushing.ops.stack.processes import _group_members

    out = []
    for pid in _group_members(pgid, live=True):
        try:
            out.append(open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode())
        except OSError:  # it ended meanwhile
            continue
    return out


def test_the_server_starts_no_job_runner_unless_asked(stack):
    """MLflow 3's GenAI job runner (seven Huey consumers, each importing MLflow) is off in the stack's server;
    the environment can still turn it on."""
    from cushing.ops.stack import server_environment

    cmds = _group_commands(stack.server.proc.pid)
    assert any("uvicorn" in c for c in cmds), cmds  # the group is the server's
    assert not [c for c in cmds if "mlflow.server.jobs" in c or "huey" in c], cmds
    assert server_environment({})["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "false"
    assert server_environment({"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "true"})["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] \
        == "true"


def test_training_lands_in_postgres_and_artifact_store(stack, first_run):
    import mlflow

    run = mlflow.MlflowClient().get_run(first_run.run_id)
    assert run.info.status == "FINISHED" and run.data.params["model"] == "resnet18"
    assert "test/f1/female" in run.data.metrics
    params = dict(_pg_rows(stack, "select key, value from params where run_uuid = %s", first_run.run_id))
    assert params["model"] == "resnet18" and params["epochs"] == "1"
    keys = {k for (k,) in _pg_rows(stack, "select distinct key from latest_metrics where run_uuid = %s",
                                   first_run.run_id)}
    assert {"val/f1", "test/auc", "test/recall/male"} <= keys
    exp = mlflow.MlflowClient().get_experiment_by_name("cushing")
    assert exp.artifact_location.startswith("mlflow-artifacts:/"), "no custom artifact location"
    stored = [p for p in stack.server.artifacts.rglob("*") if p.is_file()]
    names = {p.name for p in stored}
    assert {"predictions.csv", "per_sex.csv", "splits.csv", "weights.safetensors"} <= names
    assert any(first_run.run_id in str(p) for p in stored)


def test_client_retries_survive_a_brief_server_restart(stack, small_demo):
    """MLflow's HTTP retry variables (set by cushing) carry a run through a server restart."""
    import mlflow

    from cushing import tracking

    os.environ["MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"] = "1"  # production keeps 2; the test need not wait as long
    with tracking.start_run(experiment="cushing-retry", run_name="retry") as run:
        run.log_metrics({"before": 1.0})
        stack.server.stop()
        restarter = threading.Timer(2.0, stack.server.start)
        restarter.start()
        t0 = time.time()
        run.log_metrics({"during_restart": 2.0})  # blocks and retries until the server is back
        restarter.join()
        assert time.time() - t0 > 1.5
    got = mlflow.MlflowClient().get_run(run.run_id)
    assert got.data.metrics["during_restart"] == 2.0 and got.info.status == "FINISHED"
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "7"


# ------------------------------------------------------------------------------------------------ registry

def _promote(**kw):
    """Promotion as the demo flow runs it: these runs train on the synthetic demo cohort (--allow-synthetic)."""
    from cushing.release.registry import PromotionPolicy, promote

    return promote(experiment="cushing", policy=PromotionPolicy(**{"allow_synthetic": True, **kw.pop("policy", {})}),
                   **kw)


def _set_val_f1(run_id: str, value: float) -> None:
    """Pin a real run's validation F1 so the comparison is decided by the test, not by a 1-epoch training."""
    import mlflow

    mlflow.MlflowClient().log_metric(run_id, "val/f1", value, step=10_000)


def _promote_runs(stack):
    from cushing.tracking import find_runs

    return [r for r in find_runs("cushing") if r.tags.get("task") == "promote"]


def test_promotion_is_idempotent_and_moves_champion_only_when_better(stack, first_run, small_demo):
    import mlflow

    from cushing.workflows.experiment import run_single
    from cushing.tracking import start_run

    c = mlflow.MlflowClient()
    _set_val_f1(first_run.run_id, 0.40)
    d1 = _promote()
    assert d1.winner_run == first_run.run_id and d1.registered_new_version and d1.champion_moved
    assert c.get_model_version_by_alias("cushing", "champion").version == d1.version
    mv = c.get_model_version("cushing", d1.version)
    assert mv.tags["source_run"] == first_run.run_id and mv.tags["model"] == "resnet18"
    assert {"threshold", "data_digest", "freeze"} <= set(mv.tags)
    n_logged = len(_promote_runs(stack))
    assert n_logged == 1
    d2 = _promote()
    assert not d2.changed and d2.version == d1.version, "a second promotion changes nothing"
    assert len(_promote_runs(stack)) == n_logged and len(c.search_model_versions("name = 'cushing'")) == 1
    # a better run moves champion
    better = run_single(_config(small_demo, seed=1), progress=False)
    _set_val_f1(better.run_id, 0.60)
    d3 = _promote()
    assert d3.winner_run == better.run_id and d3.champion_moved
    champion = c.get_model_version_by_alias("cushing", "champion")
    assert champion.tags["source_run"] == better.run_id
    # a worse run (best of its own sweep) becomes challenger, but champion stays
    with start_run(experiment="cushing", run_name="sweep-parent", tags={"task": "sweep"}) as parent:
        worse = run_single(_config(small_demo, seed=2), parent_run_id=parent.run_id, progress=False)
    _set_val_f1(worse.run_id, 0.20)
    d4 = _promote(parent_run_id=parent.run_id)
    assert d4.winner_run == worse.run_id and d4.challenger_moved and not d4.champion_moved
    assert c.get_model_version_by_alias("cushing", "champion").version == champion.version
    assert c.get_model_version_by_alias("cushing", "challenger").tags["source_run"] == worse.run_id
    # the decision and ranking were logged; test metrics shown but marked unused
    logged = _promote_runs(stack)[0]
    ranking = pd.read_csv(mlflow.artifacts.download_artifacts(run_id=logged.run_id, artifact_path="ranking.csv"))
    assert "test/f1 (not used)" in ranking.columns and ranking["rank"].tolist() == sorted(ranking["rank"])


def test_a_synthetic_data_run_becomes_challenger_but_not_champion_unless_allowed(stack, first_run):
    import mlflow

    c = mlflow.MlflowClient()
    name = "cushing-synthetic-check"
    d = _promote(policy={"registered_model": name, "allow_synthetic": False}, log=False)
    assert d.winner_run and not d.champion_moved and "SYNTHETIC" in d.reason and "--allow-synthetic" in d.reason
    assert c.get_model_version_by_alias(name, "challenger").tags["synthetic_data"] == "true"
    from mlflow.exceptions import MlflowException

    with pytest.raises(MlflowException, match="champion"):
        c.get_model_version_by_alias(name, "champion")
    assert _promote(policy={"registered_model": name}, log=False).champion_moved  # the demo flow allows it


def test_gates_exclude_runs(stack, first_run):
    d = _promote(policy={"min_value": 0.99}, log=False)
    assert d.winner_run is None and not d.ranking["eligible"].any()
    assert d.ranking["excluded_because"].str.contains("misses the gate").all()


# ------------------------------------------------------------------------------------------------ serving

@pytest.fixture(scope="module")
def served(stack, celeba_dir, tmp_path_factory):
    port = free_port()
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    env = {**os.environ, "MLFLOW_ALLOW_PICKLE_DESERIALIZATION": "false"}
    with open(log, "wb") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "mlflow", "models", "serve", "-m", "models:/cushing@champion",
                                 "--env-manager", "local", "--host", "127.0.0.1", "-p", str(port)], env=env,
                                stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_http(f"http://127.0.0.1:{port}/ping", 180, proc=proc, log=log)
        yield f"http://127.0.0.1:{port}", log
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(20)


def _b64(path) -> str:
    return base64.b64encode(open(path, "rb").read()).decode()


def test_served_champion_scores_real_faces(served, celeba_dir):
    url, log = served
    photos = sorted((celeba_dir / "images").glob("*.jpg"))[:6]
    body = {"dataframe_records": [{"image": _b64(p)} for p in photos]}
    r1 = requests.post(f"{url}/invocations", json=body, timeout=60)
    r2 = requests.post(f"{url}/invocations", json=body, timeout=60)
    assert r1.status_code == 200, r1.text[:500]
    out1 = pd.DataFrame(r1.json()["predictions"])
    out2 = pd.DataFrame(r2.json()["predictions"])
    assert list(out1.columns) == ["probability", "label", "face_status", "operating_point"]
    assert out1["operating_point"][0].startswith("threshold ") and ", rule f1" in out1["operating_point"][0]
    assert "TRAINED ON SYNTHETIC DATA" in log.read_text(), "the server says so when it loads a synthetic model"
    p = out1["probability"].to_numpy()
    assert ((p >= 0) & (p <= 1)).all() and np.allclose(p, out2["probability"].to_numpy())
    assert set(out1["label"]) <= {0, 1}


@pytest.mark.parametrize("name,body,raw,status", [
    ("not an image", {"dataframe_records": [{"image": base64.b64encode(b"plain text, not a photo").decode()}]}, None,
     "not_an_image"),
    ("empty", {"dataframe_records": [{"image": ""}]}, None, "empty_file"),
    ("not base64", {"dataframe_records": [{"image": "%%%not-base64%%%"}]}, None, "not_base64"),
    ("oversized", {"dataframe_records": [{"image": "A" * (21 * 1024 * 1024)}]}, None, "too_large"),
    ("wrong column", {"dataframe_records": [{"photo": "aGVsbG8="}]}, None, None),
    ("not json", None, "{this is not json", None),
])
def test_bad_photos_get_a_status_bad_requests_a_4xx_and_server_stays_up(served, name, body, raw, status, celeba_dir):
    url, log = served
    if raw is not None:
        r = requests.post(f"{url}/invocations", data=raw, headers={"Content-Type": "application/json"}, timeout=60)
    else:
        r = requests.post(f"{url}/invocations", json=body, timeout=120)
    if status:  # a bad photo: its row says why, the request is answered
        assert r.status_code == 200, (name, r.text[:300])
        [row] = r.json()["predictions"]
        assert {k: row[k] for k in ("probability", "label", "face_status")} == {
            "probability": None, "label": -1, "face_status": status}
        assert row["operating_point"].startswith("threshold "), row  # which rule made the label, even for a refused photo
    else:
        assert 400 <= r.status_code < 500, (name, r.status_code, r.text[:300])
    assert r.headers["content-type"].startswith("application/json")
    assert str(celeba_dir) not in r.text and "demo-v1" not in r.text, "no training photo paths echoed"
    assert requests.get(f"{url}/ping", timeout=10).status_code == 200
