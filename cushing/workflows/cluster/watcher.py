"""Following a job array's tasks where Slurm keeps no accounting (no slurmdbd): there `sacct` fails and submitit's
own watcher never learns a task's state (it would wait forever on a cancelled one). Only then, and only for the
jobs of that submission, `SqueueWatcher` answers instead, from `squeue --states=all`; a task that left the queue
has ended."""
from __future__ import annotations

import subprocess
import time
from typing import Any, Sequence

__all__ = ["ACTIVE_STATES", "SqueueWatcher", "follow_with_squeue", "has_accounting", "task_states"]

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
