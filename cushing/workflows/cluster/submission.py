"""Submitting a sweep or a tuning study as a job array (the study and its parent run opened here, exactly once;
one worker per task), and, with `wait`, following it to the end: configuration and task events, the grid finished
or every task gone, then the results logged on the parent run as a local launch does.

Where Slurm keeps no accounting (no slurmdbd) `sacct` fails and submitit's own watcher never learns a task's state
(it would wait forever on a cancelled one): only then, and only for the jobs of that submission, `SqueueWatcher`
answers instead, from `squeue --states=all`; a task that left the queue has ended."""
from __future__ import annotations

import math
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

from cushing.private import private_dir
from cushing.workflows.cluster.options import SlurmOptions, ClusterError, SubmititMissing, sbatch_parameters
from cushing.workflows.cluster.refusals import _checked
from cushing.workflows.cluster.secrets import _job_environment
from cushing.workflows.cluster.task import ArrayTask, ArrayWorker, worker_tasks
from cushing.workflows.sweeps import MAX_RETRY, default_storage, finish_sweep, finish_tune, open_sweep, open_tune, \
    sweep_status

__all__ = ["Submission", "submit_sweep", "submit_tune", "ACTIVE_STATES", "SqueueWatcher", "follow_with_squeue",
           "has_accounting", "task_states"]

# squeue's long state names of a task that has not ended (UNKNOWN: not seen yet)
ACTIVE_STATES = frozenset({"PENDING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING",
                           "COMPLETING", "RESIZING", "SUSPENDED", "STOPPED", "SIGNALING", "STAGE_OUT", "PREEMPTED",
                           "RESV_DEL_HOLD", "UNKNOWN", "READY"})
GONE = "LEFT_QUEUE"  # no longer listed by squeue (past MinJobAge): it has ended


class SqueueWatcher:
    """What submitit's SlurmJob asks its watcher (register_job, get_info, get_state, is_done, update), answered
    from `squeue --states=all --array` (ended jobs stay listed for MinJobAge)."""

    def __init__(self, delay_s: float = 30.0):
        self.delay_s = delay_s
        self.jobs: set[str] = set()
        self.info: dict[str, dict[str, str]] = {}
        self.checked = float("-inf")
        self.num_calls = 0

    def register_job(self, job_id: str) -> None:
        self.jobs.add(str(job_id))

    def clear(self) -> None:
        self.info.clear()
        self.checked = float("-inf")

    def update(self) -> None:
        arrays = sorted({j.split("_")[0] for j in self.jobs if not self.is_done(j, mode="cache")})
        if not arrays:
            return
        self.num_calls += 1
        try:
            r = subprocess.run(["squeue", "--noheader", "--states=all", "--array", "--format=%i|%T|%N",
                                "--jobs=" + ",".join(arrays)], capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            r = None
        self.checked = time.time()
        if r is None or (r.returncode != 0 and "Invalid job id" not in r.stderr):  # keep what was known
            return
        listed = {f[0]: f for f in (line.strip().split("|") for line in r.stdout.splitlines()) if len(f) == 3}
        for j in self.jobs:
            if j.split("_")[0] in arrays:
                _, state, nodes = listed.get(j, (j, GONE, ""))
                self.info[j] = {"JobID": j, "State": state, "NodeList": nodes}

    def get_info(self, job_id: str, mode: str = "standard") -> dict[str, str]:
        self.register_job(job_id)
        if mode == "force" or (mode == "standard" and time.time() - self.checked >= self.delay_s):
            self.update()
        return self.info.get(str(job_id), {})

    def get_state(self, job_id: str, mode: str = "standard") -> str:
        return self.get_info(job_id, mode).get("State") or "UNKNOWN"

    def is_done(self, job_id: str, mode: str = "standard") -> bool:
        return self.get_state(job_id, mode).split()[0].upper() not in ACTIVE_STATES


def has_accounting() -> bool:
    """Slurm keeps job accounting (`sacct` answers): submitit's own watcher can follow the jobs."""
    try:
        return subprocess.run(["sacct", "--noheader", "-X", "-j", "1"], capture_output=True,
                              timeout=60).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def follow_with_squeue(jobs: Sequence[Any], delay_s: float) -> None:
    """Where `sacct` cannot answer, these jobs (only these) follow their state with squeue."""
    if not jobs or has_accounting():
        return
    watcher = SqueueWatcher(delay_s)
    for j in jobs:
        j.watcher = watcher
        watcher.register_job(j.job_id)


def task_states(jobs: Sequence[Any]) -> dict[str, str]:
    """Array task id -> state (LEFT_QUEUE once squeue no longer lists it), asked once for all tasks."""
    if not jobs:
        return {}
    watcher = jobs[0].watcher
    watcher.update()
    return {j.job_id: watcher.get_state(j.job_id, mode="cache").split()[0] for j in jobs}


@dataclass
class Submission:
    job_id: str | None  # the array's job id; None when nothing was left to do
    tasks: int
    parent_run_id: str
    study_name: str
    folder: Path
    warnings: tuple[str, ...] = ()
    sweep: Any = None  # optimize.SweepResult, once the launcher waited for the grid
    tune: Any = None  # optimize.TuneResult, once the launcher waited for the trials
    task_states: dict[str, str] = field(default_factory=dict)


def _log_folder(options: SlurmOptions) -> Path:
    return private_dir(Path(options.folder).expanduser().resolve(), narrow=True)  # pickles and logs


def _submit(task: ArrayTask, tasks: int, options: SlurmOptions, name: str, storage: str) -> list:
    try:
        import submitit
    except ImportError as e:
        raise SubmititMissing("--launcher slurm needs submitit: pip install submitit==1.5.4 (into the project's venv "
                              "after `source scripts/env.sh`)") from e
    ex = submitit.SlurmExecutor(folder=task.folder, max_num_timeout=3)
    ex.update_parameters(**sbatch_parameters(options, name, tasks))
    with _job_environment(storage):
        try:
            jobs = ex.map_array(ArrayWorker(), [task] * tasks, list(range(tasks)))
        except submitit.core.utils.FailedJobError as e:  # sbatch's own message (bad partition, account, limits)
            raise ClusterError(f"sbatch refused the job array: {e}") from e
    follow_with_squeue(jobs, delay_s=max(options.poll_s, 5.0))
    return jobs


def _say(array: str, out: Callable[[str], None]) -> Callable[[str], None]:
    return lambda text: out(f"[slurm {array}] {text}")


def submit_sweep(path: str | Path, options: SlurmOptions = SlurmOptions(), *, storage: str | None = None,
                 compile: str | None = None, wait: bool = False, out: Callable[[str], None] = print) -> Submission:
    """The grid as a Slurm job array: the study and its parent run opened here (exactly once), one sweep worker per
    array task. With `wait`, follow it to the end and log Tables II and III on the parent, as a local sweep does;
    without, the last task out logs them. Refuses (ClusterError) what cannot work across nodes."""
    storage = storage or default_storage()
    warnings = _checked(storage, options, out)
    h = open_sweep(path, storage=storage, compile=compile)
    status = sweep_status(h)
    folder = _log_folder(options)
    left = status["n"] - status["done"] - len(status["failed"])
    if status["finished"] or left <= 0:
        out(f"sweep {h.study_name}: nothing left to train ({status['done']}/{status['n']} done); logging the tables")
        return Submission(None, 0, h.parent_run_id, h.study_name, folder, warnings, sweep=finish_sweep(h))
    n = options.tasks_for(left)
    task = ArrayTask("sweep", str(h.study.path.resolve()), h.parent_run_id, compile, log_tables=not wait,
                     folder=str(folder))
    jobs = _submit(task, n, options, f"cushing-sweep-{h.study.name}", h.storage)
    array = _array_of(jobs)
    out(f"submitted Slurm job array {array}: {n} task(s), at most {options.at_once(n)} at once, for sweep "
        f"{h.study_name} ({left} of {status['n']} configurations to train); parent run {h.parent_run_id}; "
        f"task logs in {folder}")
    sub = Submission(array, n, h.parent_run_id, h.study_name, folder, warnings)
    if not wait:
        out(f"follow it with `squeue -j {array}` and `cushing sweep {path} --report`; the last task out logs "
            "Tables II and III on the parent run")
        h.grid.close()
        return sub
    sub.task_states = _follow_sweep(h, jobs, options, _say(array, out))
    sub.sweep = finish_sweep(h)
    return sub


def _follow_sweep(h, jobs: list, options: SlurmOptions, say: Callable[[str], None]) -> dict[str, str]:
    """Print configuration and task events until the grid is finished; then let the tasks leave the queue."""
    seen: dict[int, str] = {}
    last = ""
    try:
        while True:
            states = task_states(jobs)  # before the grid's status: tasks that ended after it may have finished it
            status = sweep_status(h)
            for line in _trial_lines(h, seen, worker_tasks(jobs[0].paths.folder, _array_of(jobs))):
                say(line)
            line = (f"{status['done']}/{status['n']} configurations done, {status['training']} training"
                    + (f", failed: {', '.join(status['failed'])}" if status["failed"] else "")
                    + f"; tasks: {_states_text(states)}")
            if line != last:
                say(line)
                last = line
            if status["finished"]:
                return _drain(jobs, options, say)
            if not any(s in ACTIVE_STATES for s in states.values()):
                raise ClusterError(
                    f"every task of job array {_array_of(jobs)} ended ({_states_text(states)}) with the grid "
                    f"unfinished ({status['done']}/{status['n']} done): run the same command again to submit "
                    f"workers for the rest (the task logs are in {jobs[0].paths.folder})")
            time.sleep(options.poll_s)
    except KeyboardInterrupt:
        say(f"stopped following; job array {_array_of(jobs)} keeps running (scancel {_array_of(jobs)} stops it)")
        raise


def _array_of(jobs: list) -> str:
    return jobs[0].job_id.split("_")[0]


def _states_text(states: Mapping[str, str]) -> str:
    return " ".join(f"{k.split('_', 1)[-1]}:{v}" for k, v in states.items())


def _trial_lines(h, seen: dict[int, str], workers: Mapping[str, str]) -> Iterator[str]:
    """One line per trial state not printed yet: training (on which task), done, stopped/died (retried) or failed."""
    labels = h.study.labels
    for t in sorted(h.grid.ostudy.get_trials(deepcopy=False), key=lambda t: t.number):
        label, state = t.user_attrs.get("label"), t.state.name
        if label not in labels or seen.get(t.number) == state or state == "WAITING":
            continue
        seen[t.number] = state
        where = workers.get(t.user_attrs.get("worker", ""), "?")
        deaths = len(t.system_attrs.get("retry_history", [])) + 1
        retry = "another worker retries it" if deaths <= MAX_RETRY else \
            f"not retried (its workers died {deaths} times)"
        if state == "RUNNING":
            of = t.system_attrs.get("failed_trial", t.user_attrs.get("retry_of"))
            text = f"training on task {where}" + (f" (retry of trial {of})" if of is not None else "")
        elif state == "COMPLETE":
            text = f"done on task {where}: {h.study.objective_metric} {t.value:.4f}"
        elif "error" in t.user_attrs:
            text = f"failed on task {where}: {t.user_attrs['error'][:300]} (not retried: it would fail again)"
        elif "interrupted" in t.user_attrs:
            text = f"stopped on task {where} ({t.user_attrs['interrupted'][:120]}); queued again for another worker"
        else:
            text = f"its worker (task {where}) stopped beating: cancelled, killed or lost with its node; {retry}"
        yield f"configuration {labels.index(label) + 1}/{len(labels)} {label}: {text}"


def _drain(jobs: list, options: SlurmOptions, say: Callable[[str], None], timeout: float = 180.0) -> dict[str, str]:
    """The grid is finished: pending tasks would only find nothing to do (cancelled); running ones return on their
    own within a heartbeat or two."""
    states = task_states(jobs)
    pending = [j for j in jobs if states.get(j.job_id) == "PENDING"]
    if pending:
        subprocess.run(["scancel", *(j.job_id for j in pending)], capture_output=True, timeout=60)
    deadline = time.time() + timeout
    while any(s in ACTIVE_STATES for s in states.values()) and time.time() < deadline:
        time.sleep(min(options.poll_s, 2.0))
        states = task_states(jobs)
    say(f"grid finished; tasks: {_states_text(states)}")
    return states


def submit_tune(path: str | Path, options: SlurmOptions = SlurmOptions(), *, storage: str | None = None,
                n_trials: int | None = None, compile: str | None = None, wait: bool = False,
                out: Callable[[str], None] = print) -> Submission:
    """`n_trials` (default: the file's) more trials of a tuning study as a job array, each task its share; with
    `wait`, follow the trials and log the best parameters and importances on the parent at the end."""
    storage = storage or default_storage()
    warnings = _checked(storage, options, out)
    h = open_tune(path, storage=storage, compile=compile)
    study, ostudy, parent = h.study, h.ostudy, h.parent_run_id
    total = n_trials or study.n_trials
    n = options.tasks_for(total)
    folder = _log_folder(options)
    task = ArrayTask("tune", str(study.path.resolve()), parent, compile, n_trials=math.ceil(total / n),
                     folder=str(folder))
    before = {t.number for t in ostudy.get_trials(deepcopy=False)}
    jobs = _submit(task, n, options, f"cushing-tune-{study.name}", storage)
    array = _array_of(jobs)
    out(f"submitted Slurm job array {array}: {n} task(s) x {task.n_trials} trial(s), at most {options.at_once(n)} "
        f"at once, for {ostudy.study_name}; parent run {parent}; task logs in {folder}")
    sub = Submission(array, n, parent, ostudy.study_name, folder, warnings)
    if wait:
        sub.task_states = _follow_tune(ostudy, jobs, before, n * task.n_trials, options, _say(array, out))
        sub.tune = finish_tune(h)
    return sub


def _follow_tune(ostudy, jobs: list, before: set[int], planned: int, options: SlurmOptions,
                 say: Callable[[str], None]) -> dict[str, str]:
    seen: set[int] = set()
    last = ""
    while True:
        states = task_states(jobs)
        trials = [t for t in ostudy.get_trials(deepcopy=False) if t.number not in before]
        for t in sorted(trials, key=lambda t: t.number):
            if t.number not in seen and t.state.is_finished():
                seen.add(t.number)
                value = f"{t.value:.4f}" if t.value is not None else t.state.name.lower()
                say(f"trial {len(seen)}/{planned} (study trial {t.number}): {value}")
        line = f"tasks: {_states_text(states)}"
        if line != last:
            say(line)
            last = line
        if not any(s in ACTIVE_STATES for s in states.values()):
            return states
        time.sleep(options.poll_s)
