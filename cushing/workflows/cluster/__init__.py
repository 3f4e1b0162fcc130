"""Sweeps and tuning on a Slurm cluster: a job array submitted through submitit, one worker per array task.

Nothing new coordinates the work. Each array task runs the worker `cushing sweep --workers N` runs on one host, on
the same Optuna RDB storage (who trains what: Optuna's queue, heartbeats, retries of dead workers) and the same MLflow
server (results), so exactly-once training, the retry of a configuration whose task was cancelled, preempted or lost
with its node, and resuming a half-done grid hold across nodes as they hold across processes.

Secrets never reach a command line, an #SBATCH line or the pickled task. The tasks read the Optuna storage URL from
CUSHING_OPTUNA_STORAGE and MLflow's credentials from the environment sbatch exports (its default --export=ALL;
slurmctld keeps a copy in its state folder, `scontrol show job` does not show it), or from 0600 files on shared
storage: PGPASSFILE for PostgreSQL, and CUSHING_SECRETS_FILE (KEY=VALUE lines), whose variables are then left out
of the job's environment altogether and read by each task.

Preemption and time limits: submitit asks for `--signal=USR2@90`. That signal is a cooperative stop, like Ctrl-C
(`cushing.stops`): the task stops at its next safe point, its trial is failed as interrupted (a live worker queues
it again at once) and its run ends KILLED; then submitit's own handler requeues the task (at most 3 times after
time-outs). A task Slurm itself kills or requeues (scancel, PreemptMode=CANCEL/REQUEUE, a lost node) dies by
SIGKILL after KillWait (submitit ignores SIGTERM); its trial stops beating and is retried after the grace period, and
with `--requeue` (on by default) a requeued task comes back as a worker.

Without slurmdbd, `sacct` says accounting is disabled: submitit then never learns a task's state and waits forever
on a cancelled one. Only there, and only for that submission's jobs, `SqueueWatcher` asks `squeue --states=all`
instead; a task that left the queue has ended.
submitit is imported here only, lazily.

Owns: `options` (`SlurmOptions`, time formats, sbatch parameters, `ClusterError`), `refusals` (the preflight:
what would fail or leak across nodes), `secrets` (the secrets file, the job's environment), `task` (what each
array task runs; pickled by reference), `watcher` (task states from squeue), `submission` (submitting and
following a sweep or a tuning study). May import `cushing.workflows.sweeps` and `cushing.tracking`; submitit is
imported where it is used.
"""
from __future__ import annotations

from cushing.workflows.cluster.options import DEFAULT_TIME_MIN, ClusterError, SlurmOptions, SubmititMissing, \
    parse_sbatch_options, parse_time, sbatch_parameters
from cushing.workflows.cluster.refusals import Preflight, launch_checks, preflight
from cushing.workflows.cluster.secrets import read_secrets_file
from cushing.workflows.cluster.submission import Submission, submit_sweep, submit_tune
from cushing.workflows.cluster.task import ArrayTask, ArrayWorker, run_array_task, worker_tasks
from cushing.workflows.cluster.watcher import ACTIVE_STATES, SqueueWatcher, follow_with_squeue, has_accounting, \
    task_states

__all__ = ["SlurmOptions", "Preflight", "ClusterError", "SubmititMissing", "Submission", "ArrayTask",
           "launch_checks", "preflight", "submit_sweep", "submit_tune", "run_array_task", "sbatch_parameters",
           "parse_time", "parse_sbatch_options", "read_secrets_file", "SqueueWatcher", "follow_with_squeue",
           "has_accounting", "task_states",
           "ArrayWorker", "worker_tasks", "DEFAULT_TIME_MIN", "ACTIVE_STATES"]
