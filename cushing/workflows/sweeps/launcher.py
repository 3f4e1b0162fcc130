"""A sweep launcher: open the study and its parent run, run the workers (this process, or N worker processes it
stops cleanly on SIGTERM and Ctrl-C), log the tables; and a sweep's plan (wall time per worker count)."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from cushing import stops, tracking
from cushing.data.checks import check_cohorts
from cushing.workflows.plan import Overhead, estimate, makespan
from cushing.workflows import sweeps  # its training names import torch when first used
from cushing.workflows.studies import Study
from cushing.workflows.sweeps.storage import _Grid, _open_grid, _standings, default_storage, load_for
from cushing.workflows.sweeps.tables import _log_tables, _retries, sweep_tables

__all__ = ["SweepResult", "SweepHandle", "open_sweep", "sweep_status", "finish_sweep", "run_sweep", "auto_workers",
           "plan_sweep"]


@dataclass
class SweepResult:
    parent_run_id: str
    study_name: str
    trained: int
    table2: pd.DataFrame
    table3: pd.DataFrame
    retried: list[dict]
    seconds: float


def _spawn_workers(path: Path, storage: str, parent: str, n: int, compile: str | None) -> list[int]:
    """N worker processes; the storage URL (which may hold a password) reaches them through the environment,
    never their command line (which every account on the host can read). A stop is passed on (`stop_processes`)."""
    # no MLFLOW_RUN_ID: workers log children of the parent, not into an `mlflow run` run
    env = {**{k: v for k, v in os.environ.items() if k != "MLFLOW_RUN_ID"}, "CUSHING_OPTUNA_STORAGE": storage,
           "MLFLOW_TRACKING_URI": tracking.tracking_uri()}
    procs = [subprocess.Popen([sys.executable, "-m", "cushing", "sweep", str(path), "--parent-run", parent,
                               "--worker", *(["--compile", compile] if compile else [])], env=env) for _ in range(n)]
    with stops.cooperative():  # the clean-up too: a second signal only cuts its grace short
        try:
            while any(p.poll() is None for p in procs):
                stops.check()
                stops.wait(0.5)
            return [p.returncode for p in procs]
        except KeyboardInterrupt as e:
            stop_processes(procs, forward=getattr(e, "signame", "SIGINT") != "SIGINT")
            raise


def stop_processes(procs: list[subprocess.Popen], forward: bool) -> None:
    """Stop a stopped launcher's processes without cutting their own clean-up short.

    Ctrl-C reaches the whole foreground group: the workers are failing their trial as `interrupted` already, so
    they get the grace period (CUSHING_STOP_GRACE_S, default 30 s) to exit, then SIGTERM, then SIGKILL after another.
    A SIGTERM usually reaches the launcher alone: passed on at once (`forward`). A second signal ends every grace."""
    grace = float(os.environ.get("CUSHING_STOP_GRACE_S", "30"))
    for step in ([] if forward else [None]) + [subprocess.Popen.terminate, subprocess.Popen.kill]:
        alive = [p for p in procs if p.poll() is None]
        if not alive:
            return
        for p in alive if step is not None else ():
            step(p)
        if step is subprocess.Popen.kill:
            for p in alive:
                p.wait()
            return
        deadline = time.monotonic() + grace
        while any(p.poll() is None for p in alive) and time.monotonic() < deadline and not stops.now():
            time.sleep(0.05)


def auto_workers() -> int:
    """Trainings at once on this host when not told: two on a CUDA machine (two paper-sized trainings share one
    GPU at 1.5x the throughput of one, ../shared/bench/gpu_ceiling_h200_2026-11-26.json), one on a CPU."""
    import torch

    return 2 if torch.cuda.is_available() else 1


@dataclass
class SweepHandle:
    """An open sweep that launchers (local processes, a Slurm job array) feed with workers."""

    study: Study
    storage: str  # the Optuna storage URL every worker must use
    grid: _Grid
    launcher_run: str | None  # the run `mlflow run` created for this launch, if any
    started: float

    @property
    def parent_run_id(self) -> str:
        return self.grid.parent

    @property
    def study_name(self) -> str:
        return self.grid.name


def open_sweep(path: str | Path, *, storage: str | None = None, parent_run_id: str | None = None,
               compile: str | None = None) -> SweepHandle:
    """Load the study file, check every configuration's cohort (one no claim can be made on is refused before a
    study or a run exists), open (or create) its Optuna study and parent run: what every launcher does first."""
    study = load_for(path, "sweep", compile)
    check_cohorts(study.configurations)
    launcher_run, storage = tracking.launcher_run(), storage or default_storage()  # before the parent may take it
    return SweepHandle(study, storage, _open_grid(study, storage, parent_run_id), launcher_run, time.perf_counter())


def sweep_status(h: SweepHandle) -> dict[str, Any]:
    """Where the grid stands (for progress lines): configurations done, training, failed for good, finished."""
    states = _standings(h.grid)
    # an interrupted configuration is queued again by the next worker or launch: not failed for good
    failed = sorted(k for k, s in states.items()
                    if s.failed and not (s.last is not None and "interrupted" in s.last.user_attrs))
    return {"n": len(states), "done": sum(s.done for s in states.values()),
            "training": sum(s.training for s in states.values()), "failed": failed,
            "finished": all(s.done or k in failed for k, s in states.items())}


def finish_sweep(h: SweepHandle, trained: int = -1) -> SweepResult:
    """Tables II and III and the retries on the parent run (and this launch's own run under `mlflow run`). Runs of
    the experiment whose process died (a SIGKILLed worker or launcher) are marked FAILED on the way."""
    tracking.find_runs(h.study.experiment, filter_string="attributes.status = 'RUNNING'")  # reaps the dead
    t2, t3 = sweep_tables(h.grid.parent, h.study)
    retried, done, seconds = _retries(h.grid.ostudy), sweep_status(h)["done"], time.perf_counter() - h.started
    _log_tables(h.grid.parent, t2, t3, retried, seconds, done, len(h.study.labels))
    if h.launcher_run and h.launcher_run != h.grid.parent:
        _log_pass(h.launcher_run, h.grid, trained, done)
    h.grid.close()
    return SweepResult(h.grid.parent, h.grid.name, trained, t2, t3, retried, seconds)


def run_sweep(path: str | Path, *, storage: str | None = None, workers: int | None = None, progress: bool = True,
              parent_run_id: str | None = None, compile: str | None = None) -> SweepResult:
    """The whole grid: this process (workers=1) or N worker processes on one storage; then the tables.

    workers=None takes `auto_workers()`. `compile` overrides the file's; it is not part of the study's identity.
    Under `mlflow run`, its run becomes the study's parent on the first launch, later a child recording the pass."""
    h = open_sweep(path, storage=storage, parent_run_id=parent_run_id, compile=compile)
    try:
        workers = workers or auto_workers()
        if sweep_status(h)["finished"]:
            trained = 0  # nothing queued or training: no worker to start
        elif workers > 1:
            trained, codes = -1, _spawn_workers(h.study.path, h.storage, h.grid.parent, workers, compile)
            if any(codes):
                raise RuntimeError(f"sweep workers exited with {codes}")
        else:
            trained = sweeps.sweep_worker(h.study, h.storage, progress=progress, grid=h.grid)
        return finish_sweep(h, trained)
    finally:
        h.grid.close()


def _log_pass(run_id: str, grid: _Grid, trained: int, done: int) -> None:
    """A later `mlflow run -e sweep` on a study that already has its parent: its run becomes a child of that
    parent saying what this pass did, instead of an empty top-level run."""
    with tracking.resume_run(run_id) as r:
        r.nest_under(grid.parent)
        r.set_tags({"mlflow.runName": f"sweep-{grid.study.name}-pass", "task": "sweep-pass", "study": grid.name})
        r.log_metrics({"sweep/configurations_done": float(done), "sweep/trained_here": float(max(trained, 0))})


def plan_sweep(path: str | Path, workers: list[int], compile: str | None = None, overhead: Overhead | None = None
               ) -> tuple[pd.DataFrame, dict[int, float]]:
    """Per-configuration estimates (H200 seconds; `schedule`) and the estimated wall time per worker count."""
    study = load_for(path, "sweep", compile)
    est = [estimate(c, overhead) for c in study.configurations]
    table = pd.DataFrame({"configuration": study.labels, "compile_s": [e.compile_s for e in est],
                          "train_s": [e.gpu_s for e in est], "other_s": [e.overhead_s for e in est],
                          "total_s": [e.total_s for e in est]})
    return table, {w: makespan(est, w) for w in workers}
