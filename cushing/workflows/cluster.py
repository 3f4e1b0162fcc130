"""Sweeps and tuning on a Slurm cluster: a job array submitted through submitit, one worker per array task.

Nothing new coordinates the work. Each array task runs the worker `cushing sweep --workers N` runs on one host, on
the same Optuna RDB storage (who trains what: atomic claims, heartbeats, retries of dead workers) and the same MLflow
server (results), so exactly-once training, the retry of a configuration whose task was cancelled, preempted or lost
with its node, and resuming a half-done grid hold across nodes as they hold across processes.

Secrets never reach a command line, an #SBATCH line or the pickled task. The tasks read the Optuna storage URL from
CUSHING_OPTUNA_STORAGE and MLflow's credentials from the environment sbatch exports (its default --export=ALL;
slurmctld keeps a copy in its state folder, `scontrol show job` does not show it), or from 0600 files on shared
storage: PGPASSFILE for PostgreSQL, and CUSHING_SECRETS_FILE (KEY=VALUE lines), whose variables are then left out
of the job's environment altogether and read by each task.

Preemption and time limits: submitit asks for `--signal=USR2@90` and, on that signal, requeues the task (at most 3
times after time-outs); the trial the task was training is marked interrupted first (`Preempted`), so a live worker
retries it at once. A task Slurm itself kills or requeues (scancel, PreemptMode=CANCEL/REQUEUE, a lost node) dies by
SIGKILL after KillWait (submitit ignores SIGTERM); its trial stops beating and is retried after the grace period, and
with `--requeue` (on by default) a requeued task comes back as a worker.

Without slurmdbd, `sacct` says accounting is disabled: submitit then never learns a task's state and waits forever
on a cancelled one. `SqueueInfoWatcher` asks `squeue --states=all` instead; a task that left the queue has ended.
submitit is imported here only, lazily.
"""
from __future__ import annotations

import contextlib
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence
from urllib.parse import urlparse
from cushing.tracking import tracking_uri
from cushing.workflows.sweeps import default_storage, finish_sweep, MAX_RETRY, open_sweep, run_tune, sweep_status, sweep_worker
from cushing.workflows.sweeps.claims import GridClaims
from cushing.workflows import sweeps as o

__all__ = ["SlurmOptions", "Preflight", "ClusterError", "SubmititMissing", "Preempted", "Submission", "ArrayTask",
           "launch_checks", "preflight", "submit_sweep", "submit_tune", "run_array_task", "sbatch_parameters",
           "parse_time", "parse_sbatch_options", "read_secrets_file", "install_squeue_watcher", "task_states",
           "ArrayWorker", "worker_tasks", "DEFAULT_TIME_MIN", "ACTIVE_STATES"]

DEFAULT_TIME_MIN = 24 * 60  # per task; above 10 min so that submitit requeues a preempted task
STORAGE_ENV = "CUSHING_OPTUNA_STORAGE"
SECRETS_FILE_ENV = "CUSHING_SECRETS_FILE"
# squeue's long state names of a task that has not ended (UNKNOWN: not seen yet)
ACTIVE_STATES = frozenset({"PENDING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING",
                           "COMPLETING", "RESIZING", "SUSPENDED", "STOPPED", "SIGNALING", "STAGE_OUT", "PREEMPTED",
                           "RESV_DEL_HOLD", "UNKNOWN", "READY"})
GONE = "LEFT_QUEUE"  # no longer listed by squeue (past MinJobAge): it has ended
# sbatch options the launcher sets itself (array, logs, preemption signal) or that would put the environment on the
# command line (`export=VAR=value`): refused in --slurm-option
MANAGED_OPTIONS = frozenset({"array", "output", "error", "open-mode", "signal", "job-name", "wckey", "export",
                             "export-file", "wrap", "parsable", "requeue", "no-requeue", "time", "partition",
                             "account", "mem", "gpus-per-task", "cpus-per-task"})
SECRET_VARIABLES = ("MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_CLIENT_CERT_PATH",
                    "PGPASSWORD", "DATABRICKS_TOKEN", "AWS_SECRET_ACCESS_KEY")
_LOOPBACK = {"localhost", "127.0.0.1", "::1", "0.0.0.0", "ip6-localhost"}


class ClusterError(RuntimeError):
    """A launch refused (with every reason at once) or a job array that cannot finish the grid."""


class SubmititMissing(ImportError, ClusterError):
    pass


def _submitit():
    try:
        import submitit
    except ImportError as e:
        raise SubmititMissing("--launcher slurm needs submitit: pip install submitit==1.5.4 (into the project's venv "
                              "after `source scripts/env.sh`)") from e
    return submitit


# ------------------------------------------------------------------------------------------------ options

def parse_time(text: str | int | None) -> int | None:
    """Slurm's time formats (minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS) as whole minutes; None for ''."""
    if text is None or str(text).strip() in ("", "None"):
        return None
    s = str(text).strip()
    m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", s)
    if not m:
        raise ClusterError(f"time limit: minutes or [D-]HH:MM[:SS] as sbatch takes it, got {s!r}")
    days, a, b, c = (int(g) if g is not None else None for g in m.groups())
    if days is not None:  # D-HH[:MM[:SS]]
        seconds = days * 86400 + a * 3600 + (b or 0) * 60 + (c or 0)
    elif c is not None:  # HH:MM:SS
        seconds = a * 3600 + b * 60 + c
    else:  # MM or MM:SS
        seconds = a * 60 + (b or 0)
    if seconds <= 0:
        raise ClusterError(f"time limit must be positive, got {s!r}")
    return math.ceil(seconds / 60)


def parse_sbatch_options(items: Sequence[str]) -> dict[str, Any]:
    """`key=value` (or a bare `key` flag) per item, as sbatch's long options without the dashes."""
    out: dict[str, Any] = {}
    problems = []
    for item in items:
        key, sep, value = str(item).strip().lstrip("-").partition("=")
        key = key.strip()
        if not re.fullmatch(r"[a-z][a-z0-9_-]*", key):
            problems.append(f"{item!r}: expected key=value with an sbatch long option as key (e.g. qos=high)")
        elif key.replace("_", "-") in MANAGED_OPTIONS:
            problems.append(f"{item!r}: {key} is set by the launcher (or would put the environment on the command "
                            "line); use its own option")
        elif any(ch in value for ch in "\n\r\0"):
            problems.append(f"{key}: a value cannot span lines")
        else:
            out[key.replace("_", "-")] = value if sep else True
    if problems:
        raise ClusterError("bad --slurm-option: " + "; ".join(problems))
    return out


@dataclass(frozen=True)
class SlurmOptions:
    """What the job array asks Slurm for. `array` None: one task per configuration still to train (tune: per
    trial), capped by `max_parallel`; `max_parallel` also caps the tasks running at once (`--array=0-N%M`)."""

    partition: str | None = None
    account: str | None = None
    time_min: int = DEFAULT_TIME_MIN
    gpus_per_task: int | None = None
    cpus_per_task: int | None = None
    mem_gb: float | None = None
    array: int | None = None
    max_parallel: int | None = None
    extra: tuple[str, ...] = ()
    requeue: bool = True
    folder: Path = Path("slurm-logs")  # submission scripts, pickles and task logs: on storage the nodes share
    poll_s: float = 5.0

    def __post_init__(self) -> None:
        problems = []
        for name in ("time_min", "gpus_per_task", "cpus_per_task", "array", "max_parallel"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v < (0 if name == "gpus_per_task" else 1)):
                problems.append(f"{name}: a positive whole number, got {v!r}")
        if self.mem_gb is not None and not self.mem_gb > 0:
            problems.append(f"mem_gb: must be > 0, got {self.mem_gb!r}")
        for name in ("partition", "account"):
            v = getattr(self, name)
            if v is not None and not re.fullmatch(r"[A-Za-z0-9_.,:+-]+", v):
                problems.append(f"{name}: {v!r} is not a Slurm name")
        if problems:
            raise ClusterError("bad Slurm options: " + "; ".join(problems))
        parse_sbatch_options(self.extra)

    def tasks_for(self, work: int) -> int:
        """Array size: the one asked for, else one task per unit of work, capped by max_parallel."""
        if self.array:
            return self.array
        return max(1, min(work, self.max_parallel or work))

    def at_once(self, tasks: int) -> int:
        return min(tasks, self.max_parallel or tasks)


def _mem(gb: float) -> str:
    return f"{int(gb)}G" if gb == int(gb) else f"{math.ceil(gb * 1024)}M"


def sbatch_parameters(options: SlurmOptions, name: str, tasks: int) -> dict[str, Any]:
    """submitit's SlurmExecutor parameters (they become #SBATCH lines: no secret may go here)."""
    extra = parse_sbatch_options(options.extra)
    extra["requeue" if options.requeue else "no-requeue"] = True
    params: dict[str, Any] = {"job_name": name, "time": options.time_min, "array_parallelism": options.at_once(tasks),
                              "stderr_to_stdout": True, "additional_parameters": extra}
    for key, value in (("partition", options.partition), ("account", options.account),
                       ("cpus_per_task", options.cpus_per_task), ("gpus_per_task", options.gpus_per_task)):
        if value is not None:
            params[key] = value
    if options.mem_gb is not None:
        params["mem"] = _mem(options.mem_gb)
    return params


# ------------------------------------------------------------------------------------------------ refusals

@dataclass(frozen=True)
class Preflight:
    problems: tuple[str, ...] = ()  # any one refuses the launch
    warnings: tuple[str, ...] = ()


def _scheme(url: str) -> str:
    return url.split(":", 1)[0].lower() if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*:", url) else ""


def _host(url: str) -> str | None:
    """The host a URL names; '' for a database reached through a local socket (no host)."""
    try:
        u = urlparse(url)
    except ValueError:
        return None
    host = u.hostname or ""
    if not host and "host=" in (u.query or ""):
        host = re.search(r"host=([^&]+)", u.query).group(1)
        return "" if host.startswith("/") else host
    return host


def _is_loopback(url: str) -> bool:
    host = _host(url)
    if host is None:
        return False
    if host == "":  # postgresql:///db: a Unix socket on whichever host runs the client
        return _scheme(url).startswith("postgres")
    return host.lower() in _LOOPBACK or host.startswith("127.")


def _mode_problem(var: str, path: str) -> str | None:
    p = Path(path)
    if not p.is_file():
        return f"{var}={path}: no such file (it must exist on every node, e.g. on shared storage)"
    mode = p.stat().st_mode & 0o777
    if mode & 0o077:
        return f"{var}={path} has mode {mode:o}: other accounts can read it; chmod 600 {path}"
    return None


def launch_checks(*, tracking_uri: str, storage: str, sbatch: str | None, srun: str | None,
                  compute_hosts: Sequence[tuple[str, ...]] | None, local_names: set[str],
                  private_files: Mapping[str, str] | None = None,
                  secrets_in_env: Sequence[str] = ()) -> Preflight:
    """What would make a multi-node launch fail or leak, found before anything is submitted.

    compute_hosts: per node of the partition, its name, hostname and address (None: could not be listed)."""
    problems, warnings = [], []
    if sbatch is None or srun is None:
        missing = " and ".join(n for n, p in (("sbatch", sbatch), ("srun", srun)) if p is None)
        problems.append(f"no {missing} found on PATH: run the launcher on a Slurm login node (Debian: apt-get "
                        "install slurm-client), or use --launcher local")
    if _scheme(tracking_uri) in ("", "file", "sqlite"):
        problems.append(f"the tracking store {tracking_uri} is this host's embedded store (SQLite + local files), "
                        "which the compute nodes do not share: set MLFLOW_TRACKING_URI to the MLflow server "
                        "(`cushing stack up`, `docker compose up -d`)")
    if _scheme(storage) == "sqlite" or storage.startswith("sqlite"):
        problems.append(f"the Optuna storage {storage} is a SQLite file on this host, which the compute nodes do "
                        "not share (and SQLite's locks are unsafe on network file systems): pass --storage or set "
                        "CUSHING_OPTUNA_STORAGE to postgresql://optuna@HOST/optuna")
    local_slurm = bool(compute_hosts) and all(any(n in local_names or n.startswith("127.") for n in node if n)
                                              for node in compute_hosts)
    for what, url in (("tracking URI", tracking_uri), ("Optuna storage", storage)):
        if _scheme(url) in ("", "file", "sqlite") or not _is_loopback(url):
            continue
        if local_slurm:
            warnings.append(f"the {what} {_redact(url)} is on this host's loopback: fine while Slurm's nodes are "
                            "this host, unreachable from any other node")
        else:
            nodes = ", ".join(node[0] for node in compute_hosts) if compute_hosts else "(sinfo could not list them)"
            problems.append(f"the {what} {_redact(url)} names this host's loopback, which the compute nodes "
                            f"({nodes}) cannot reach: use an address they reach (this host's name on the cluster "
                            "network)")
    for var, path in (private_files or {}).items():
        problem = _mode_problem(var, path)
        if problem:
            problems.append(problem)
    if secrets_in_env:
        verb = "reaches" if len(secrets_in_env) == 1 else "reach"
        warnings.append(f"{', '.join(secrets_in_env)} {verb} the tasks through the job's environment (sbatch "
                        "--export=ALL: slurmctld keeps a copy readable by Slurm's administrators, `scontrol show "
                        f"job` does not show it); to keep them out of Slurm, put them in a 0600 file named by "
                        f"{SECRETS_FILE_ENV} (KEY=VALUE lines) on shared storage")
    return Preflight(tuple(problems), tuple(warnings))


def _redact(url: str) -> str:
    """The URL without its password, for messages."""
    return re.sub(r"(//[^/:@]*):[^@/]*@", r"\1:***@", url)


def _local_names() -> set[str]:
    names = {socket.gethostname(), socket.gethostname().split(".")[0], *_LOOPBACK}
    with contextlib.suppress(OSError):
        names.add(socket.getfqdn())
        names.update(socket.gethostbyname_ex(socket.gethostname())[2])
    return names


def _partition_hosts(partition: str | None) -> list[tuple[str, ...]] | None:
    """(name, hostname, address) of every node of the partition (the default one when None); None on failure."""
    cmd = ["sinfo", "--noheader", "--Node", "--format=%N|%n|%o"] + (["--partition", partition] if partition else [])
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    rows = [tuple(part.strip() for part in line.split("|")) for line in r.stdout.splitlines() if line.strip()]
    return rows if r.returncode == 0 and rows else None


def _secrets_in_env(storage: str, tracking_uri: str) -> list[str]:
    covered = set(read_secrets_file(os.environ[SECRETS_FILE_ENV])) if os.environ.get(SECRETS_FILE_ENV) else set()
    names = [k for k in SECRET_VARIABLES if os.environ.get(k) and k not in covered]
    if urlparse(storage).password and STORAGE_ENV not in covered:
        names.append(f"the password in {STORAGE_ENV}")
    if urlparse(tracking_uri).password:
        names.append("the password in MLFLOW_TRACKING_URI")
    return names


def preflight(storage: str, options: SlurmOptions) -> Preflight:
    """`launch_checks` on this host's environment (PATH, MLFLOW_TRACKING_URI, the partition's nodes, file modes)."""
    uri = tracking_uri()
    sbatch, srun = shutil.which("sbatch"), shutil.which("srun")
    files = {k: os.environ[k] for k in ("PGPASSFILE", SECRETS_FILE_ENV) if os.environ.get(k)}
    unreadable = SECRETS_FILE_ENV in files and _mode_problem(SECRETS_FILE_ENV, files[SECRETS_FILE_ENV])
    secrets = [] if unreadable else _secrets_in_env(storage, uri)  # (an unusable secrets file is a problem already)
    return launch_checks(tracking_uri=uri, storage=storage, sbatch=sbatch, srun=srun,
                         compute_hosts=_partition_hosts(options.partition) if sbatch else None,
                         local_names=_local_names(), private_files=files, secrets_in_env=secrets)


def _checked(storage: str, options: SlurmOptions, out: Callable[[str], None]) -> tuple[str, ...]:
    found = preflight(storage, options)
    if found.problems:
        raise ClusterError("refusing to submit to Slurm:\n  - " + "\n  - ".join(found.problems))
    for w in found.warnings:
        out(f"warning: {w}")
    return found.warnings


# ------------------------------------------------------------------------------------------------ secrets

def read_secrets_file(path: str | os.PathLike) -> dict[str, str]:
    """KEY=VALUE lines (`export ` and quotes allowed, # comments) from a file only its owner can read."""
    problem = _mode_problem(SECRETS_FILE_ENV, str(path))
    if problem:
        raise ClusterError(problem)
    out = {}
    for line in Path(path).read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.removeprefix("export ").partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key.strip()):
            raise ClusterError(f"{path}: expected KEY=VALUE lines, got {line.split('=')[0]!r}...")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        out[key.strip()] = value
    return out


@contextlib.contextmanager
def _job_environment(storage: str) -> Iterator[None]:
    """What sbatch exports to the tasks (submitit runs it with this process's environment): the storage URL and the
    tracking URI set, `mlflow run`'s run and the secrets file's variables left out, this checkout importable."""
    saved = dict(os.environ)
    env = os.environ
    env[STORAGE_ENV] = storage
    env["MLFLOW_TRACKING_URI"] = tracking_uri()
    env.pop("MLFLOW_RUN_ID", None)  # tasks log children of the parent, not into an `mlflow run` run
    if env.get(SECRETS_FILE_ENV):
        secret = read_secrets_file(env[SECRETS_FILE_ENV])
        if secret.get(STORAGE_ENV, storage) != storage:
            raise ClusterError(f"{SECRETS_FILE_ENV} sets {STORAGE_ENV} to another storage than this launch's: the "
                               "tasks would train another study")
        for key in secret:
            env.pop(key, None)
    root = Path(__file__).resolve().parents[2]  # the checkout holding cushing/
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    if (root / "pyproject.toml").exists() and str(root) not in paths:  # a source checkout, not an installed package
        env["PYTHONPATH"] = os.pathsep.join([str(root), *paths])
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


# ------------------------------------------------------------------------------------------------ the task

class Preempted(KeyboardInterrupt):
    """Slurm preempted the task or its time ran out. Raised like Ctrl-C, so the trial in training is marked
    interrupted (retried by a live worker at once) and its MLflow run ends KILLED."""

    def __init__(self, message: str, requeued: bool):
        super().__init__(message)
        self.requeued = requeued


@dataclass(frozen=True)
class ArrayTask:
    """What every array task runs (pickled by submitit: nothing secret in it)."""

    kind: str  # sweep | tune
    path: str
    parent_run_id: str
    compile: str | None = None
    n_trials: int = 0  # tune: this task's share
    log_tables: bool = False  # sweep with no launcher waiting: the last task out logs Tables II and III
    folder: str = ""  # where each task records which worker (host:pid, as the claims table names it) it is


def run_array_task(task: ArrayTask, index: int) -> int:
    """The function each array task runs: one sweep worker (or `task.n_trials` tuning trials) on the storage named by
    CUSHING_OPTUNA_STORAGE in the task's environment. Module-level, so submitit sends it by reference and the node
    imports it (the venv or the image must hold this package). Returns how many it trained."""
    if os.environ.get(SECRETS_FILE_ENV):
        os.environ.update(read_secrets_file(os.environ[SECRETS_FILE_ENV]))
    storage = os.environ.get(STORAGE_ENV)
    if not storage:
        raise ClusterError(f"{STORAGE_ENV} is not set in this task's environment")
    _announce(task, index)
    _interrupt_on_preemption()
    try:
        return _sweep_task(task, storage) if task.kind == "sweep" else _tune_task(task, storage)
    except Preempted as e:
        print(f"[cushing] {e}: this worker stops; its trial is retried by another", flush=True)
        if e.requeued:
            raise SystemExit(-1) from None  # as submitit exits after a requeue: no result, the task runs again
        raise RuntimeError(str(e)) from None


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
    # every worker returns once the grid is finished, all seeing the same trials: one claim picks who logs the tables
    if task.log_tables and h.grid.claims.claim(h.study_name, "__tables__", len(h.grid.ostudy.get_trials())):
        finish_sweep(h, trained)
    else:
        h.grid.close()
    return trained


def _tune_task(task: ArrayTask, storage: str) -> int:
    res = run_tune(task.path, storage=storage, n_trials=task.n_trials, progress=False,
                   parent_run_id=task.parent_run_id, compile=task.compile)
    return res.n_complete


def _task_id(index: int) -> tuple[str, str]:
    array = os.environ.get("SLURM_ARRAY_JOB_ID") or os.environ.get("SLURM_JOB_ID") or "local"
    return array, f"{array}_{os.environ.get('SLURM_ARRAY_TASK_ID', index)}"


def _announce(task: ArrayTask, index: int) -> None:
    """Say (and record, for the launcher) which worker this task is: the claims table names workers host:pid."""
    array, task_id = _task_id(index)
    owner = GridClaims.owner()
    restart = os.environ.get("SLURM_RESTART_COUNT", "0")
    print(f"[cushing] array task {task_id} (restart {restart}) is worker {owner}", flush=True)
    if task.folder:
        d = Path(task.folder) / "cushing-workers" / array
        d.mkdir(parents=True, exist_ok=True)
        (d / owner).write_text(task_id)


def worker_tasks(folder: str | os.PathLike, array_id: str) -> dict[str, str]:
    """Worker (host:pid, as in the claims table) -> array task id ('12_1') for a job array's tasks so far."""
    d = Path(folder) / "cushing-workers" / str(array_id)
    if not d.is_dir():
        return {}
    return {p.name: p.read_text().strip() for p in d.iterdir() if p.is_file()}


def _interrupt_on_preemption() -> None:
    """submitit's handler of the preemption signal requeues the task, then exits (SystemExit): inside training that
    would mark the trial as an error, never retried. Turn its exit into `Preempted` instead."""
    sig = getattr(signal, "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2"), None)
    current = signal.getsignal(sig) if sig is not None else None
    if not callable(current):
        return

    def handler(signum, frame) -> None:
        try:
            current(signum, frame)
        except SystemExit:
            raise Preempted(f"preempted (signal {signal.Signals(signum).name}); requeued", requeued=True) from None
        except Exception as e:  # submitit's UncompletedJobError: timed out too often, not requeued
            raise Preempted(f"stopped and not requeued: {e}", requeued=False) from None
    signal.signal(sig, handler)


# ------------------------------------------------------------------------------------------------ squeue watcher

def _watcher_class():
    from submitit.slurm.slurm import SlurmInfoWatcher

    class SqueueInfoWatcher(SlurmInfoWatcher):
        """submitit's watcher asks `sacct`, which fails without slurmdbd: then a task's state stays UNKNOWN and a
        cancelled task is waited on forever. This one asks `squeue --states=all` (ended jobs stay listed for
        MinJobAge); a registered task no longer listed has ended."""

        def _make_command(self):
            to_check = {x.split("_")[0] for x in self._registered - self._finished}
            if not to_check:
                return None
            return ["squeue", "--noheader", "--states=all", "--format=%i|%T|%N",
                    "--jobs=" + ",".join(sorted(to_check))]

        def read_info(self, string):
            if not isinstance(string, str):
                string = string.decode()
            return super().read_info("JobID|State|NodeList\n" + string)

        def update(self) -> None:
            command = self._make_command()
            if command is None:
                return
            self._num_calls += 1
            try:
                r = subprocess.run(command, capture_output=True, text=True, timeout=60)
            except (OSError, subprocess.TimeoutExpired):
                self._last_status_check = time.time()
                return
            if r.returncode != 0 and "Invalid job id" not in r.stderr:  # squeue failed: keep what we knew
                self._last_status_check = time.time()
                return
            info = self.read_info(r.stdout if r.returncode == 0 else "")
            asked = set(command[-1].split("=", 1)[1].split(","))
            for job_id in self._registered - self._finished:
                if job_id.split("_")[0] in asked and job_id not in info:
                    info[job_id] = {"JobID": job_id, "State": GONE}
            self._info_dict.update(info)
            self._last_status_check = time.time()
            for job_id in self._registered - self._finished:
                if self.is_done(job_id, mode="cache"):
                    self._finished.add(job_id)

        def is_done(self, job_id: str, mode: str = "standard") -> bool:
            return self.get_state(job_id, mode=mode).split()[0].upper() not in ACTIVE_STATES

    return SqueueInfoWatcher


def install_squeue_watcher(delay_s: float = 30.0):
    """Make submitit's Slurm jobs (array tasks included) follow their state with squeue; returns the watcher.
    Replacing the executor's job class is not enough: array tasks are made as `SlurmJob` whatever it says."""
    from submitit.slurm import slurm

    watcher = _watcher_class()(delay_s=int(delay_s))
    slurm.SlurmJob.watcher = watcher
    return watcher


def task_states(jobs: Sequence[Any]) -> dict[str, str]:
    """Array task id -> squeue state (LEFT_QUEUE once no longer listed), asked once for all tasks."""
    if not jobs:
        return {}
    watcher = jobs[0].watcher
    watcher.update()
    return {j.job_id: watcher.get_state(j.job_id, mode="cache").split()[0] for j in jobs}


# ------------------------------------------------------------------------------------------------ submission

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
    folder = Path(options.folder).expanduser().resolve()
    folder.mkdir(parents=True, exist_ok=True)
    folder.chmod(0o700)  # pickles and logs: this account's only
    return folder


def _submit(task: ArrayTask, tasks: int, options: SlurmOptions, name: str, storage: str) -> list:
    submitit = _submitit()
    install_squeue_watcher(delay_s=max(options.poll_s, 5.0))
    ex = submitit.SlurmExecutor(folder=task.folder, max_num_timeout=3)
    ex.update_parameters(**sbatch_parameters(options, name, tasks))
    with _job_environment(storage):
        try:
            return ex.map_array(ArrayWorker(), [task] * tasks, list(range(tasks)))
        except submitit.core.utils.FailedJobError as e:  # sbatch's own message (bad partition, account, limits)
            raise ClusterError(f"sbatch refused the job array: {e}") from e


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
    array = jobs[0].job_id.split("_")[0]
    out(f"submitted Slurm job array {array}: {n} task(s), at most {options.at_once(n)} at once, for sweep "
        f"{h.study_name} ({left} of {status['n']} configurations to train); parent run {h.parent_run_id}; "
        f"task logs in {folder}")
    sub = Submission(array, n, h.parent_run_id, h.study_name, folder, warnings)
    if not wait:
        out(f"follow it with `squeue -j {array}` and `cushing sweep {path} --report`; the last task out logs "
            "Tables II and III on the parent run")
        h.grid.claims.close()
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
    owners = h.grid.claims.claimed(h.study_name)
    labels = h.study.labels
    deaths: dict[str, int] = {}
    for t in sorted(h.grid.ostudy.get_trials(deepcopy=False), key=lambda t: t.number):
        label, state = t.user_attrs.get("label"), t.state.name
        died = state == "FAIL" and not any(k in t.user_attrs for k in ("error", "interrupted", "superseded"))
        deaths[label] = deaths.get(label, 0) + died
        if label not in labels or seen.get(t.number) == state:
            continue
        seen[t.number] = state
        attempt = int(t.system_attrs.get("grid_attempt", 0))
        where = workers.get(owners.get((label, attempt), ""), "?")
        retry = "another worker retries it" if deaths[label] <= MAX_RETRY else \
            f"not retried (its workers died {deaths[label]} times)"
        if state == "RUNNING":
            text = f"training on task {where}" + (f" (retry {attempt})" if attempt else "")
        elif state == "COMPLETE":
            text = f"done on task {where}: {h.study.objective_metric} {t.value:.4f}"
        elif "error" in t.user_attrs:
            text = f"failed on task {where}: {t.user_attrs['error'][:300]} (not retried: it would fail again)"
        elif "interrupted" in t.user_attrs:
            text = f"stopped on task {where} ({t.user_attrs['interrupted'][:120]}); the next launch retries it"
        elif "superseded" in t.user_attrs:
            text = f"left by task {where} to the worker that took it over while it started"
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


# ------------------------------------------------------------------------------------------------ tune

def submit_tune(path: str | Path, options: SlurmOptions = SlurmOptions(), *, storage: str | None = None,
                n_trials: int | None = None, compile: str | None = None, wait: bool = False,
                out: Callable[[str], None] = print) -> Submission:
    """`n_trials` (default: the file's) more trials of a tuning study as a job array, each task its share; with
    `wait`, follow the trials and log the best parameters and importances on the parent at the end."""
    storage = storage or o.default_storage()
    warnings = _checked(storage, options, out)
    h = o.open_tune(path, storage=storage, compile=compile)
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
        sub.tune = o.finish_tune(h)
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
