"""Sweeps and tuning on a Slurm cluster: a job array submitted through submitit, one worker per array task.

Nothing new coordinates the work: each task runs the worker `cushing sweep --workers N` runs on one host, on the
same Optuna storage and MLflow server, so exactly-once training, retries of cancelled, preempted or lost tasks and
resuming a half-done grid hold across nodes as across processes. Secrets never reach a command line, an #SBATCH line
or the pickled task. A task Slurm kills or requeues dies by SIGKILL after KillWait (submitit ignores SIGTERM); its
trial stops beating and is retried after the grace period; with `--requeue` a requeued task comes back as a worker.

Owns: `options`, `refusals` (the preflight), `secrets`, `task` (what each array task runs; pickled by reference),
`submission` (and squeue where Slurm keeps no accounting). May import `cushing.workflows.sweeps` and
`cushing.tracking`; submitit is imported where it is used, lazily.
"""
from __future__ import annotations

from cushing.workflows.cluster.options import DEFAULT_TIME_MIN, ClusterError, SlurmOptions, SubmititMissing, \
    parse_sbatch_options, parse_time, sbatch_parameters
from cushing.workflows.cluster.refusals import Preflight, launch_checks, preflight
from cushing.workflows.cluster.secrets import read_secrets_file
from cushing.workflows.cluster.submission import ACTIVE_STATES, SqueueWatcher, Submission, follow_with_squeue, \
    has_accounting, submit_sweep, submit_tune, task_states
from cushing.workflows.cluster.task import ArrayTask, ArrayWorker, run_array_task, worker_tasks

__all__ = ["SlurmOptions", "Preflight", "ClusterError", "SubmititMissing", "Submission", "ArrayTask",
           "launch_checks", "preflight", "submit_sweep", "submit_tune", "run_array_task", "sbatch_parameters",
           "parse_time", "parse_sbatch_options", "read_secrets_file", "SqueueWatcher", "follow_with_squeue",
           "has_accounting", "task_states", "ArrayWorker", "worker_tasks", "DEFAULT_TIME_MIN", "ACTIVE_STATES"]
