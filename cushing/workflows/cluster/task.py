"""What each array task runs: one sweep worker (or its share of tuning trials) on the storage its environment
names. Preemption and time limits: submitit asks for `--signal=USR2@90`, here a cooperative stop like Ctrl-C (the
trial fails as interrupted and is queued again, its run ends KILLED); then submitit's own handler, called from the
task's code, requeues the task (at most 3 times after time-outs). Module-level: submitit pickles it by reference."""
from __future__ import annotations

import os
import signal
from dataclasses import dataclass
from pathlib import Path

from cushing import stops
from cushing.workflows.cluster.options import ClusterError
from cushing.workflows.cluster.secrets import SECRETS_FILE_ENV, STORAGE_ENV, read_secrets_file
from cushing.workflows.sweeps import finish_sweep, open_sweep, run_tune, sweep_worker
from cushing.workflows.sweeps.worker import worker_id

__all__ = ["ArrayTask", "run_array_task", "ArrayWorker", "worker_tasks"]


@dataclass(frozen=True)
class ArrayTask:
    """What every array task runs (pickled by submitit: nothing secret in it)."""

    kind: str  # sweep | tune
    path: str
    parent_run_id: str
    compile: str | None = None
    n_trials: int = 0  # tune: this task's share
    log_tables: bool = False  # sweep with no launcher waiting: the last task out logs Tables II and III
    folder: str = ""  # where each task records which worker (host:pid, as a trial's `worker` names it) it is


def run_array_task(task: ArrayTask, index: int) -> int:
    """The function each array task runs (the venv or the image on the node must hold this package). Returns how
    many it trained."""
    if os.environ.get(SECRETS_FILE_ENV):
        os.environ.update(read_secrets_file(os.environ[SECRETS_FILE_ENV]))
    storage = os.environ.get(STORAGE_ENV)
    if not storage:
        raise ClusterError(f"{STORAGE_ENV} is not set in this task's environment")
    _announce(task, index)
    preempt = _preemption()
    try:
        with stops.cooperative():
            return _sweep_task(task, storage) if task.kind == "sweep" else _tune_task(task, storage)
    except stops.Stopped as e:
        if preempt is None or e.signame != preempt[0].name:
            raise
        print(f"[cushing] preempted ({e.signame}): this worker stops; its trial is queued again for another",
              flush=True)
        try:
            preempt[1](preempt[0], None)  # submitit's handler: `scontrol requeue`, then it exits (SystemExit)
        except Exception as err:  # submitit's UncompletedJobError: timed out too often, not requeued
            raise RuntimeError(f"stopped and not requeued: {err}") from None
        raise


class ArrayWorker:
    """What submitit runs in each task: `run_array_task`, plus submitit's `checkpoint` hook, so that a task whose time
    limit comes (USR2, 90 s before it) is requeued as a fresh worker (at most 3 times) instead of ending; the
    configuration it was training is retried at once by a live worker."""

    def __call__(self, task: ArrayTask, index: int) -> int:
        return run_array_task(task, index)

    def checkpoint(self, task: ArrayTask, index: int):
        from submitit.helpers import DelayedSubmission

        return DelayedSubmission(self, task, index)


def _sweep_task(task: ArrayTask, storage: str) -> int:
    h = open_sweep(task.path, storage=storage, parent_run_id=task.parent_run_id, compile=task.compile)
    trained = sweep_worker(h.study, h.storage, progress=False, grid=h.grid)
    # every worker returns once the grid is finished: the first to record it in the study logs the tables
    if task.log_tables and _first_to_finish(h):
        finish_sweep(h, trained)
    else:
        h.grid.close()
    return trained


def _first_to_finish(h) -> bool:
    with h.grid.lock():
        n = len(h.grid.ostudy.get_trials(deepcopy=False))
        if h.grid.ostudy.user_attrs.get("tables_logged_for") == n:
            return False
        h.grid.ostudy.set_user_attr("tables_logged_for", n)
        return True


def _tune_task(task: ArrayTask, storage: str) -> int:
    return run_tune(task.path, storage=storage, n_trials=task.n_trials, progress=False,
                    parent_run_id=task.parent_run_id, compile=task.compile).n_complete


def _task_id(index: int) -> tuple[str, str]:
    array = os.environ.get("SLURM_ARRAY_JOB_ID") or os.environ.get("SLURM_JOB_ID") or "local"
    return array, f"{array}_{os.environ.get('SLURM_ARRAY_TASK_ID', index)}"


def _announce(task: ArrayTask, index: int) -> None:
    """Say (and record, for the launcher) which worker this task is: a trial's `worker` attribute names it host:pid."""
    array, task_id = _task_id(index)
    owner = worker_id()
    restart = os.environ.get("SLURM_RESTART_COUNT", "0")
    print(f"[cushing] array task {task_id} (restart {restart}) is worker {owner}", flush=True)
    if task.folder:
        d = Path(task.folder) / "cushing-workers" / array
        d.mkdir(parents=True, exist_ok=True)
        (d / owner).write_text(task_id)


def worker_tasks(folder: str | os.PathLike, array_id: str) -> dict[str, str]:
    """Worker (host:pid, as a trial's `worker` attribute) -> array task id ('12_1') for a job array's tasks so far."""
    d = Path(folder) / "cushing-workers" / str(array_id)
    return {p.name: p.read_text().strip() for p in d.iterdir() if p.is_file()} if d.is_dir() else {}


def _preemption():
    """(signal, submitit's handler) for the preemption signal, which becomes a cooperative stop here; None outside
    a submitit task."""
    sig = getattr(signal, "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2"), None)
    current = signal.getsignal(sig) if sig is not None else None
    if not callable(current):
        return None
    stops.install(sig.name)
    return sig, current
