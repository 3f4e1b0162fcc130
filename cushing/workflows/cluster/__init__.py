"""Sweeps and tuning on a Slurm cluster: a job array submitted through submitit, one worker per array task.

Nothing new coordinates the work. Each array task runs the worker `cushing sweep --workers N` runs on one host, on
the same Optuna RDB storage (who trains what: Optuna's queue, heartbeats, retries of dead workers) and the same MLflow
server (results), so exactly-once training, the retry of a configuration whose task was cancelled, preempted or lost
with its node, and resuming a half-done grid hold across nodes as they hold across processes. Secrets never reach a
command line, an #SBATCH line or the pickled task (`secrets`). Slurm's preemption signal is a cooperative stop
(`task`). A task Slurm itself kills or requeues (scancel, PreemptMode=CANCEL/REQUEUE, a lost node) dies by SIGKILL
after KillWait (submitit ignores SIGTERM); its trial stops beating and is retried after the grace period, and with
`--requeue` (on by default) a requeued task comes back as a worker.

Owns: `options` (`SlurmOptions`, time formats, sbatch parameters, `ClusterError`), `refusals` (the preflight:
what would fail or leak across nodes), `secrets` (the secrets file, the job's environment), `task` (what each
array task runs; pickled by reference), `watcher` (task states from squeue where Slurm keeps no accounting),
`submission` (submitting and following a sweep or a tuning study). May import `cushing.workflows.sweeps` and
`cushing.tracking`; submitit is imported where it is used, lazily.
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
           "has_accounting", "task_states", "ArrayWorker", "worker_tasks", "DEFAULT_TIME_MIN", "ACTIVE_STATES"]
