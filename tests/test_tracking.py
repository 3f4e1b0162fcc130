"""The run logger against a real embedded MLflow store: per-epoch metrics written in the background, in order,
flushed on demand, failures surfaced in the training thread, and the run's status set by what happened."""
from __future__ import annotations

import pytest

from cushing import tracking as trk


def _history(run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in trk.client().get_metric_history(run_id, key))


def test_epoch_metrics_land_in_order_and_flush_waits_for_them(tracking):  # `tracking`: a fresh embedded store
    with tracking_run("epochs") as run:
        for epoch in range(1, 121):
            run.log_epoch(epoch, {"val/f1": epoch / 120, "train/loss": 1.0 / epoch})
        run.flush()  # every queued epoch is in the store when flush returns
        assert _history(run.run_id, "epoch/val/f1") == [(e, e / 120) for e in range(1, 121)]
        run.log_epoch(121, {"val/f1": 1.0})
    # closing the run writes what is still queued
    assert _history(run.run_id, "epoch/val/f1")[-1] == (121, 1.0)
    assert _history(run.run_id, "val/f1") == [], "per-epoch values never land under the final name"
    assert tracking_status(run.run_id) == "FINISHED"


def test_a_failed_write_is_raised_in_the_training_thread_and_fails_the_run(tracking):
    with pytest.raises(RuntimeError, match="per-epoch metrics"):
        with tracking_run("bad") as run:
            run.log_epoch(1, {"k" * 300: 0.5})  # MLflow rejects metric names over 250 characters
            run.flush()
    assert tracking_status(run.run_id) == "FAILED"


def test_the_body_error_is_not_masked_by_a_logging_error(tracking):
    with pytest.raises(KeyError, match="the body's own error"):
        with tracking_run("both") as run:
            run.log_epoch(1, {"k" * 300: 0.5})
            raise KeyError("the body's own error")
    assert tracking_status(run.run_id) == "FAILED"


def test_final_metrics_at_step_zero_and_params_kept_from_mlflow_run(tracking):
    with tracking_run("final") as run:
        from mlflow.entities import Param

        trk.client().log_batch(run.run_id, params=[Param("weights", "''"), Param("epochs", "3")])  # as `mlflow run`
        # logs -P weights= and -P epochs=3
        run.log_params({"weights": None, "epochs": 3, "lr": 0.01, "freeze": "auto"})
        run.log_params({"epochs": 5})  # a value that really differs is kept beside the original
        run.log_metrics({"test/f1": 0.5, "val/f1": 0.25})
    p = trk.get_run(run.run_id).params
    assert p["weights"] == "''" and p["epochs"] == "3" and p["lr"] == "0.01" and p["resolved/epochs"] == "5"
    assert _history(run.run_id, "test/f1") == [(0, 0.5)]


def tracking_run(name: str):
    return trk.start_run(experiment="tracking-test", run_name=name, use_env_run=False)


def tracking_status(run_id: str) -> str:
    return trk.get_run(run_id).status


def test_logging_into_an_ended_run_keeps_its_status(tracking):
    """Grad-CAMs computed later for a killed run do not make it FINISHED (and so promotable); a run another
    process holds open stays RUNNING."""
    with tracking_run("killed") as run:
        pass
    trk.end_run_as(run.run_id, "KILLED")
    with trk.resume_run(run.run_id) as r:
        r.log_metrics({"later": 1.0})
        assert tracking_status(run.run_id) == "KILLED", "never reopened: nothing to reap or to end"
    assert tracking_status(run.run_id) == "KILLED" and trk.get_run(run.run_id).metrics["later"] == 1.0
    c = trk.client()
    held = c.create_run(c.get_experiment_by_name("tracking-test").experiment_id).info.run_id  # open in another process
    with trk.resume_run(held) as r:
        r.log_metrics({"from_a_worker": 2.0})
    assert tracking_status(held) == "RUNNING"


def test_a_pid_is_only_checked_on_the_machine_and_pid_namespace_that_owns_it(tracking):
    """A container sharing this hostname has its own pids: its run is judged by its heartbeat, not by ours."""
    import socket
    import subprocess
    import time

    dead = subprocess.Popen(["true"])
    dead.wait()
    for machine, reaped in (("another-boot:4026531836", False), (trk.machine_id(), True)):
        with tracking_run("elsewhere") as run:
            trk.set_tags(run.run_id, {"cushing.process": f"{socket.gethostname()}/{dead.pid}:1",
                                      "cushing.machine": machine, "cushing.heartbeat": str(int(time.time()))})
            assert trk.reap([trk.get_run(run.run_id)]) == int(reaped)
            assert tracking_status(run.run_id) == ("FAILED" if reaped else "RUNNING")
            if reaped:
                assert "is gone" in trk.get_run(run.run_id).tags["cushing.died"]


def test_a_failed_run_says_why_in_one_line(tracking):
    with pytest.raises(ValueError):
        with tracking_run("why") as run:
            raise ValueError("the cohort has no patients in its validation split\nsecond line")
    tags = trk.get_run(run.run_id).tags
    assert tracking_status(run.run_id) == "FAILED"
    assert tags[trk.ERROR_TAG] == "ValueError: the cohort has no patients in its validation split"


def test_under_mlflow_run_the_launchers_experiment_is_the_experiment(tracking, monkeypatch, capsys):
    """`mlflow run --experiment-name A` made the run in A: a command that names no experiment logs into A; one that
    names B is refused with one line before anything runs (its runs would nest under a run of another experiment)."""
    from cushing.cli import main
    from cushing.config import ConfigError

    c = trk.client()
    launcher = c.create_run(trk.experiment_id("A")).info.run_id
    monkeypatch.setenv("MLFLOW_RUN_ID", launcher)
    assert trk.resolve_experiment("") == "A" and trk.resolve_experiment("A") == "A"
    with pytest.raises(ConfigError, match="'B' is not the experiment `mlflow run` made this run in \\('A'\\)"):
        trk.resolve_experiment("B")
    assert main(["train", "--experiment", "B", "--pretrained", "false", "--epochs", "1"]) == 2
    err = capsys.readouterr().err
    assert "experiment 'B' is not the experiment `mlflow run` made this run in ('A')" in err
    assert "--experiment-name B" in err and len(err.strip().splitlines()) == 1
    with trk.start_run(experiment="", run_name="taken") as run:  # "": the launcher's
        assert run.run_id == launcher
    with trk.start_run(experiment="", run_name="next") as other:
        assert other.run_id != launcher and trk.get_run(other.run_id).experiment_id == trk.experiment_id("A")


def test_experiments_are_marked_for_model_development_and_a_users_kind_stays(tracking, monkeypatch):
    """The MLflow 3 UI keeps an experiment's kind as the tag `mlflow.experimentKind` (its experiment-type selector
    writes `custom_model_development` for "Machine learning"): an experiment made here gets it, one `mlflow run
    --experiment-name` made gets it when its first run is taken, and a kind the user chose is never changed."""
    kind = "mlflow.experimentKind"
    with tracking_run("new"):
        pass
    c = trk.client()
    assert c.get_experiment_by_name("tracking-test").tags[kind] == "custom_model_development"
    made = c.create_experiment("made-by-mlflow-run")  # as `mlflow run --experiment-name` makes it: no kind
    monkeypatch.setenv("MLFLOW_RUN_ID", c.create_run(made).info.run_id)
    with trk.start_run(experiment="made-by-mlflow-run", run_name="taken"):
        pass
    assert c.get_experiment(made).tags[kind] == "custom_model_development"
    users = c.create_experiment("a-genai-one", tags={kind: "genai_development"})
    with trk.start_run(experiment="a-genai-one", run_name="mine", use_env_run=False):
        pass
    assert c.get_experiment(users).tags[kind] == "genai_development"
    assert trk.runs_link("tracking-test").endswith(
        f"/#/experiments/{c.get_experiment_by_name('tracking-test').experiment_id}/runs?workflowType=machine_learning")
