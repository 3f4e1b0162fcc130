"""Cooperative stops (cushing/stops.py): a signal only asks; the code stops at safe points it owns. One test per
defect of the design it replaced (a signal turned into an exception raised anywhere in the main thread, held back
by hand in places found one by one):

1. a stop while a run is being created ended the run in the wrong state (FINISHED, or RUNNING for good);
2. a stop inside a held store call cancelled any running interval timer (pytest-timeout's);
3. Slurm's preemption signal raised from its handler, straight into whatever the task was doing;
4. a second Ctrl-C was ignored, although the docs say it cuts the grace short;
5. a trial's value was told from a Future's callback: a failed `tell` was dropped and the trained configuration
   trained again;
6. the environment was written (MLFLOW_RUN_ID swaps, CUSHING_LOGGING_MODEL) while other threads ran;
7. private names of Optuna and of the standard library, and interval timers.
(3 is in tests/test_cluster.py, beside the real Slurm preemption test.)"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest
import yaml

from cushing import stops
from tests.conftest import ROOT, env_vars

TINY = dict(model="resnet18", pretrained=False, img_size=16, epochs=1, bootstrap=0, cam=False, log_model=False,
            audit="off", checkpoint_every=0)


@pytest.fixture()
def handlers():
    """This process handles SIGINT and SIGTERM as the CLI does for the test; its own handlers come back after."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    signal.signal(signal.SIGINT, signal.default_int_handler)  # pytest-xdist's workers ignore SIGINT; a terminal's not
    stops.reset()
    stops.install()
    yield
    for s, h in saved.items():
        signal.signal(s, h)
    stops.reset()


@pytest.fixture()
def cooperative(handlers):
    """... and the test runs inside a cooperative scope, as a run's code does."""
    with stops.cooperative():
        yield
        stops.reset()  # what the test asked ends with it


def test_code_without_safe_points_stays_stoppable(handlers):
    """Outside every cooperative scope (code with no safe points: following Slurm jobs, waiting for a server) the
    first signal raises at once, as Python's own Ctrl-C does, and later ones (during the clean-up) do not; a scope's
    end answers a stop that no safe point answered."""
    threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGTERM)).start()
    t = time.monotonic()
    with pytest.raises(stops.Stopped) as e:
        time.sleep(30)
    assert time.monotonic() - t < 5 and e.value.signame == "SIGTERM"
    for _ in range(3):  # the clean-up's signals: recorded, never raised
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)
    assert stops.now() and stops.requested() == "SIGTERM"
    stops.reset()
    with pytest.raises(stops.Stopped) as e:
        with stops.cooperative():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.1)  # no safe point in here: the stop waits for the scope's end
            assert stops.requested() == "SIGINT"
    assert e.value.signame == "SIGINT"


def _runs(uri: str, experiment: str) -> list:
    import mlflow

    c = mlflow.MlflowClient(uri)
    exp = c.get_experiment_by_name(experiment)
    return c.search_runs([exp.experiment_id]) if exp else []


def test_signals_only_ask_the_first_stops_a_second_means_now(cooperative):
    assert stops.requested() is None and not stops.wait(0.05)
    stops.check()  # nothing asked: a safe point goes on
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(0.05)
    assert stops.requested() == "SIGTERM" and not stops.now()
    assert stops.wait(30), "a wait ends at once once a stop is asked"
    t = time.monotonic()
    assert not stops.grace(0.3) and time.monotonic() - t >= 0.3, "the clean-up's grace lasts until a second signal"
    with pytest.raises(stops.Stopped) as e:
        stops.check()
    assert isinstance(e.value, KeyboardInterrupt) and e.value.signame == "SIGTERM"
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(0.05)
    assert stops.now() and stops.grace(30) and stops.requested() == "SIGTERM"
    assert stops.exit_code("SIGTERM") == 143 and stops.exit_code("SIGINT") == 130


def test_a_stop_while_the_run_is_being_created_ends_it_killed(cooperative, tmp_path, cushing_home, monkeypatch):
    """Defect 1: the stop arrives inside the store call that creates the run. It is raised at the first safe point
    inside the run's scope, so the run ends KILLED (not FINISHED with no metrics, nor RUNNING for good)."""
    import mlflow

    from cushing.config import TrainConfig
    from cushing.workflows.experiment import run_experiment

    create = mlflow.MlflowClient.create_run

    def create_then_signal(self, *args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)  # lands while the run is being created
        return create(self, *args, **kwargs)
    monkeypatch.setattr(mlflow.MlflowClient, "create_run", create_then_signal)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with env_vars({"MLFLOW_TRACKING_URI": uri}), pytest.raises(KeyboardInterrupt) as e:
        run_experiment(TrainConfig(**TINY, experiment="created"), progress=False)
    (run,) = _runs(uri, "created")
    assert run.info.status == "KILLED" and e.value.cushing_run == run.info.run_id
    assert "epoch/train/loss" not in run.data.metrics, "stopped before training"


def test_a_stop_inside_a_store_call_leaves_interval_timers_alone(cooperative, tmp_path, cushing_home, monkeypatch):
    """Defect 2: a stop landing inside a store write is answered at the next safe point, and nothing touches
    SIGALRM or the interval timer someone else set (pytest-timeout's, say)."""
    import mlflow

    from cushing.config import TrainConfig
    from cushing.workflows.experiment import run_experiment

    log_batch, sent = mlflow.MlflowClient.log_batch, []

    def batch_then_signal(self, *args, **kwargs):
        if not sent:
            sent.append(1)
            os.kill(os.getpid(), signal.SIGTERM)
        return log_batch(self, *args, **kwargs)
    monkeypatch.setattr(mlflow.MlflowClient, "log_batch", batch_then_signal)
    saved_handler = signal.signal(signal.SIGALRM, lambda *a: None)
    saved_timer = signal.setitimer(signal.ITIMER_REAL, 300)
    try:
        with env_vars({"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}), \
                pytest.raises(KeyboardInterrupt):
            run_experiment(TrainConfig(**TINY, experiment="timers"), progress=False)
        assert sent and 200 < signal.getitimer(signal.ITIMER_REAL)[0] <= 300, "the timer still runs"
    finally:
        signal.setitimer(signal.ITIMER_REAL, *saved_timer)
        signal.signal(signal.SIGALRM, saved_handler)


def test_a_stop_is_answered_within_one_batch_and_at_an_epoch_end_checkpoints(cooperative):
    """Between batches: the next batch does not start. At an epoch's end: a checkpoint first, whatever the period."""
    import numpy as np
    import torch

    from cushing.data.bank import ImageBank
    from cushing.model.augment import DeviceAugment
    from cushing.model.backbones import build_model, preprocess_of
    from cushing.model.engine import FitSettings, fit

    labels = np.array([0, 1] * 40)
    bank = ImageBank(torch.randint(0, 255, (80, 3, 16, 16), dtype=torch.uint8), torch.device("cpu"), 1e9)
    s = FitSettings(epochs=5, batch_size=8, lr=0.01, momentum=0.9, weight_decay=0.0, oversample=1, aug_strength=0.0,
                    aug_views=1, seed=0, frozen=False, progress=False, checkpoint_every=1, checkpoint_seconds=1e9)
    tr, va = np.arange(60), np.arange(60, 80)

    def model():
        m = build_model("resnet18", pretrained=False, img_size=16)
        return m, DeviceAugment(preprocess_of(m, 16), torch.device("cpu"), 0.0)
    m, aug = model()
    forwards = []
    m.register_forward_pre_hook(lambda mod, args: forwards.append(1) if mod.training else None)

    def signal_on_third(mod, args):
        if mod.training and len(forwards) == 3:
            os.kill(os.getpid(), signal.SIGTERM)
    m.register_forward_pre_hook(signal_on_third)
    with pytest.raises(stops.Stopped):
        fit(m, bank, labels, tr, va, aug, s)
    assert len(forwards) == 3, "no batch after the one the stop came in"

    stops.reset()
    m, aug = model()
    saved = []
    with pytest.raises(stops.Stopped):
        fit(m, bank, labels, tr, va, aug, s, on_epoch=lambda e, metrics: e == 2 and os.kill(os.getpid(),
                                                                                             signal.SIGTERM),
            on_checkpoint=saved.append)
    assert [st.epoch for st in saved] == [2], "checkpointed at the stop although the period is far off"


def test_a_second_signal_cuts_the_grace_short(cooperative, monkeypatch):
    """Defect 4: a launcher stopped by Ctrl-C gives its workers a grace period to finish their own clean-up; a
    second Ctrl-C ends it at once (SIGTERM, then SIGKILL to what still runs), as the docs say."""
    from cushing.workflows.sweeps.launcher import stop_processes

    monkeypatch.setenv("CUSHING_STOP_GRACE_S", "60")
    stubborn = subprocess.Popen([sys.executable, "-c", "import signal, time; signal.signal(signal.SIGINT, "
                                 "signal.SIG_IGN); signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(120)"])
    time.sleep(0.5)
    os.kill(os.getpid(), signal.SIGINT)  # the first Ctrl-C
    threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGINT)).start()  # the second, a second later
    t = time.monotonic()
    stop_processes([stubborn], forward=False)
    assert time.monotonic() - t < 15, "the second Ctrl-C ended the 60 s grace"
    assert stubborn.poll() == -signal.SIGKILL


def _sweep_file(tmp_path, name: str) -> str:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"name": name, "kind": "sweep", "experiment": name, "base": {"data": "demo", **{
        k: v for k, v in TINY.items() if k != "model"}}, "configurations": [
        {"model": "resnet18", "label": "a"}, {"model": "resnet18", "label": "b", "lr": 0.01}]}))
    return str(path)


def test_a_tell_that_fails_once_is_retried_and_nothing_trains_twice(tmp_path, cushing_home, monkeypatch):
    """Defect 5: the store refuses the first `tell` (SQLite busy, a server restarting). The worker retries it on its
    own thread; every configuration ends with exactly one FINISHED run and one COMPLETE trial."""
    import optuna
    import sqlalchemy as sa

    from cushing.workflows.sweeps import run_sweep

    tell, failed = optuna.Study.tell, []

    def flaky_tell(self, trial, values=None, *args, **kwargs):
        if values is not None and not failed:
            failed.append(1)
            raise sa.exc.OperationalError("tell", {}, Exception("database is locked"))
        return tell(self, trial, values, *args, **kwargs)
    monkeypatch.setattr(optuna.Study, "tell", flaky_tell)
    uri, storage = f"sqlite:///{tmp_path / 'mlflow.db'}", f"sqlite:///{tmp_path / 'optuna.db'}"
    with env_vars({"MLFLOW_TRACKING_URI": uri, "CUSHING_HEARTBEAT_S": "1", "CUSHING_GRACE_S": "2"}):
        res = run_sweep(_sweep_file(tmp_path, "flaky"), storage=storage, workers=1, progress=False)
    assert failed and res.trained == 2
    kids = [r for r in _runs(uri, "flaky") if r.data.tags.get("sweep_config")]
    assert sorted(r.data.tags["sweep_config"] for r in kids) == ["a", "b"], "each trained once"
    assert all(r.info.status == "FINISHED" for r in kids)
    trials = optuna.load_study(study_name=res.study_name, storage=storage).get_trials()
    assert sorted(t.state.name for t in trials) == ["COMPLETE", "COMPLETE"]


def test_a_finished_run_is_never_trained_again(tmp_path, cushing_home, monkeypatch):
    """A worker dies after its run FINISHED but before it told Optuna: its trial stops beating, goes stale and is
    queued again; the worker that takes it finds the finished run and tells its value instead of training it."""
    import optuna

    from cushing.workflows.sweeps import run_sweep

    tell = optuna.Study.tell

    def die_before_telling_a(self, trial, values=None, *args, **kwargs):
        if values is not None and trial.user_attrs.get("label") == "a":
            raise SystemExit("killed")  # the worker dies here: its trial is neither told nor failed
        return tell(self, trial, values, *args, **kwargs)
    uri, storage = f"sqlite:///{tmp_path / 'mlflow.db'}", f"sqlite:///{tmp_path / 'optuna.db'}"
    path = _sweep_file(tmp_path, "told")
    with env_vars({"MLFLOW_TRACKING_URI": uri, "CUSHING_HEARTBEAT_S": "1", "CUSHING_GRACE_S": "1"}):
        monkeypatch.setattr(optuna.Study, "tell", die_before_telling_a)
        with pytest.raises(SystemExit):
            run_sweep(path, storage=storage, workers=1, progress=False)
        monkeypatch.setattr(optuna.Study, "tell", tell)
        time.sleep(2.5)  # its trial goes stale
        res = run_sweep(path, storage=storage, workers=1, progress=False)
    assert res.trained == 1, "only b trains"
    kids = [r for r in _runs(uri, "told") if r.data.tags.get("sweep_config")]
    assert sorted(r.data.tags["sweep_config"] for r in kids) == ["a", "b"] and all(
        r.info.status == "FINISHED" for r in kids)
    trials = optuna.load_study(study_name=res.study_name, storage=storage).get_trials()
    (recovered,) = [t for t in trials if "recovered" in t.user_attrs]
    a_run = next(r for r in kids if r.data.tags["sweep_config"] == "a")
    assert recovered.state.name == "COMPLETE" and recovered.user_attrs["mlflow_run_id"] == a_run.info.run_id
    assert recovered.value == a_run.data.metrics["val/f1"]


def test_no_environment_write_while_other_threads_run(tmp_path, cushing_home, monkeypatch):
    """Defect 6: writing the environment while other threads read it is a race in the C library. A run (with its
    heartbeat and epoch-writer threads, and the model logged) and a sweep write none."""
    from cushing.config import TrainConfig
    from cushing.workflows.experiment import run_experiment
    from cushing.workflows.sweeps import run_sweep

    writes, watching = [], []
    for name in ("putenv", "unsetenv"):
        real = getattr(os, name)

        def record(*args, _real=real, _name=name):
            if watching and threading.active_count() > 1:
                writes.append((_name, args[0], [t.name for t in threading.enumerate()]))
            return _real(*args)
        monkeypatch.setattr(os, name, record)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with env_vars({"MLFLOW_TRACKING_URI": uri}):
        watching.append(1)
        run_experiment(TrainConfig(**{**TINY, "log_model": True}, experiment="env"), progress=False)
        run_sweep(_sweep_file(tmp_path, "envsweep"), storage=f"sqlite:///{tmp_path / 'optuna.db'}", workers=1,
                  progress=False)
        watching.clear()
    assert writes == []


def test_no_private_names_no_timers_and_submitits_watcher_left_alone():
    """Defect 7: no private module of Optuna, no private names of `logging` or of locks, no interval timer; and
    submitit's class-wide job watcher is never replaced (only the jobs of a submission without Slurm accounting
    get the squeue watcher, `follow_with_squeue`)."""
    pattern = re.compile(r"optuna\.storages\._|logging\._lock|_handlerList|setitimer|_is_owned|SlurmJob\.watcher\s*=")
    hits = [f"{p.relative_to(ROOT)}:{i}" for p in (ROOT / "cushing").rglob("*.py")
            for i, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert hits == []


def test_the_squeue_watcher_is_used_only_without_slurm_accounting(tmp_path, monkeypatch):
    from cushing.workflows.cluster import SqueueWatcher, follow_with_squeue

    class Job:
        def __init__(self, job_id):
            self.job_id, self.watcher = job_id, "submitit's"
    for answer, expected in ((0, "submitit's"), (1, SqueueWatcher)):
        sacct = tmp_path / str(answer) / "sacct"
        sacct.parent.mkdir()
        sacct.write_text(f"#!/bin/sh\nexit {answer}\n")
        sacct.chmod(0o755)
        monkeypatch.setenv("PATH", f"{sacct.parent}{os.pathsep}{os.environ['PATH']}")
        jobs = [Job("7_0"), Job("7_1")]
        follow_with_squeue(jobs, delay_s=5)
        if expected == "submitit's":
            assert [j.watcher for j in jobs] == ["submitit's"] * 2
        else:
            assert isinstance(jobs[0].watcher, expected) and jobs[0].watcher is jobs[1].watcher
            assert jobs[0].watcher.jobs == {"7_0", "7_1"}
