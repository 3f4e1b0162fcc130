"""A run stopped the ways users' conditions stop it: SIGTERM (docker stop, a scheduler), Ctrl-C, SIGKILL (an OOM
kill) and a kill in the middle of a checkpoint write. Each ends in the documented state; a killed run resumes to the
same final metrics as one that never stopped."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import env_vars, foreground_job

pytestmark = [pytest.mark.slow, pytest.mark.faults]

ARGS = ["--model", "resnet18", "--pretrained", "false", "--img-size", "32", "--bootstrap", "0", "--cam", "false",
        "--log-model", "false", "--experiment", "stops"]


@pytest.fixture()
def store(tmp_path, cushing_home, demo_manifest):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "CUSHING_RUN_HEARTBEAT_S": "1"}
    env.pop("MLFLOW_RUN_ID", None)
    return {"uri": uri, "env": env, "dir": tmp_path}


def _start(store, *extra: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "cushing", "train", *ARGS, *extra], cwd=store["dir"],
                            env={**store["env"], **(env or {})}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, preexec_fn=foreground_job)


def _runs(store) -> list:
    import mlflow

    with env_vars({"MLFLOW_TRACKING_URI": store["uri"]}):
        c = mlflow.MlflowClient()
        exp = c.get_experiment_by_name("stops")
        return c.search_runs([exp.experiment_id]) if exp else []


def _wait_training(store, proc, timeout: float = 240) -> object:
    """Until the run has logged a training epoch (so the signal lands mid-training)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, proc.communicate()
        try:
            runs = [r for r in _runs(store) if "epoch/train/loss" in r.data.metrics]
        except Exception:  # the store is being created
            runs = []
        if runs:
            return runs[0]
        time.sleep(0.5)
    pytest.fail("training never started")


@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_sigterm_and_ctrl_c_end_the_run_killed_with_one_line(store, sig, code):
    proc = _start(store, "--epochs", "60")
    run = _wait_training(store, proc)
    os.killpg(proc.pid, sig) if sig == signal.SIGTERM else os.kill(proc.pid, sig)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err[-2000:]
    assert "Traceback" not in err
    line = [s for s in err.splitlines() if s.startswith("cushing train: stopped by")]
    assert line == [f"cushing train: stopped by {signal.Signals(sig).name}; run {run.info.run_id} is marked KILLED "
                    "(it stopped before its first checkpoint, see checkpoint_minutes: train it again)"]
    (after,) = _runs(store)
    assert after.info.status == "KILLED" and after.info.end_time is not None


def test_signals_during_the_cleanup_do_not_cut_it_short(store):
    """A scheduler's SIGTERM followed at once by more (and a terminal's Ctrl-C): the first one stops the run, the
    rest are ignored while it is marked KILLED; the message points at the checkpoint it can continue from."""
    proc = _start(store, "--epochs", "60", "--checkpoint-minutes", "0")
    deadline = time.time() + 240
    while not [r for r in _runs(store) if "checkpoint_epoch" in r.data.tags]:
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.3)
    for sig in (signal.SIGTERM, signal.SIGTERM, signal.SIGINT, signal.SIGTERM):
        os.kill(proc.pid, sig)
        time.sleep(0.02)
    out, err = proc.communicate(timeout=60)
    # signals pending together are handled in signal-number order, so SIGINT may be the one that stops it
    name = {143: "SIGTERM", 130: "SIGINT"}.get(proc.returncode)
    assert name and "Traceback" not in err, (proc.returncode, err[-2000:])
    (after,) = _runs(store)
    assert after.info.status == "KILLED" and after.info.end_time is not None
    assert [s for s in err.splitlines() if "stopped by" in s] == [
        f"cushing train: stopped by {name}; run {after.info.run_id} is marked KILLED (continue it from its last "
        f"checkpoint: cushing train --resume {after.info.run_id})"]


def test_sigkill_leaves_a_run_the_next_command_marks_failed(store):
    proc = _start(store, "--epochs", "60")
    run = _wait_training(store, proc)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(30)
    assert _runs(store)[0].info.status == "RUNNING", "nothing could mark it: the process died at once"
    from cushing.tracking import find_runs

    with env_vars({"MLFLOW_TRACKING_URI": store["uri"]}):
        (met,) = find_runs("stops")  # what promote, dashboard, compare and sweeps call
    assert met.run_id == run.info.run_id and met.status == "FAILED"
    assert "is gone" in met.tags["cushing.died"]


def test_a_kill_during_a_checkpoint_write_resumes_to_the_same_result(store):
    """Uninterrupted vs killed halfway through writing epoch 2's checkpoint, then resumed from epoch 1."""
    each_epoch = ["--checkpoint-every", "1", "--checkpoint-minutes", "0"]
    plain = subprocess.run([sys.executable, "-m", "cushing", "train", *ARGS, "--epochs", "3", *each_epoch,
                            "--run-name", "plain"], cwd=store["dir"], env=store["env"],
                           capture_output=True, text=True, timeout=600)
    assert plain.returncode == 0, plain.stderr[-2000:]
    proc = _start(store, "--epochs", "3", *each_epoch, "--run-name", "killed",
                  env={"CUSHING_FAULT": "kill-in-checkpoint:2"})
    proc.communicate(timeout=600)
    assert proc.returncode == -signal.SIGKILL
    killed = next(r for r in _runs(store) if r.data.tags["mlflow.runName"] == "killed")
    assert killed.data.tags["checkpoint_epoch"] == "1", "the half-written epoch-2 checkpoint never replaced it"
    ckpt = Path(store["env"]["CUSHING_HOME"]) / "checkpoints" / killed.info.run_id
    assert (ckpt / "checkpoint.pt").exists()
    from cushing.model.checkpoint import resume_lock

    with env_vars({"CUSHING_HOME": store["env"]["CUSHING_HOME"]}), resume_lock(killed.info.run_id):
        busy = subprocess.run([sys.executable, "-m", "cushing", "train", "--resume", killed.info.run_id],
                              cwd=store["dir"], env=store["env"], capture_output=True, text=True, timeout=600)
    assert busy.returncode == 2 and "being resumed by another process" in busy.stderr, busy.stderr[-2000:]
    resumed = subprocess.run([sys.executable, "-m", "cushing", "train", "--resume", killed.info.run_id],
                             cwd=store["dir"], env=store["env"], capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    runs = {r.data.tags["mlflow.runName"]: r for r in _runs(store)}
    a, b = runs["plain"], runs["killed"]
    assert b.info.run_id == killed.info.run_id and b.info.status == "FINISHED", "the same run, continued"
    assert b.data.tags["resumed_from_epoch"] == "1"
    keys = [k for k in a.data.metrics if k.startswith(("val/", "test/")) or k in ("best_epoch", "threshold")]
    assert len(keys) > 50
    assert {k: b.data.metrics[k] for k in keys} == pytest.approx({k: a.data.metrics[k] for k in keys}, nan_ok=True)
    import mlflow

    with env_vars({"MLFLOW_TRACKING_URI": store["uri"]}):
        steps = [m.step for m in mlflow.MlflowClient().get_metric_history(b.info.run_id, "epoch/train/loss")]
    assert sorted(steps) == [1, 2, 3], "epochs logged before the kill are not logged twice"
    assert not ckpt.exists(), "a finished run's checkpoint is removed"
