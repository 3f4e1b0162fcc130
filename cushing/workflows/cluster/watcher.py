"""Following a job array's tasks without slurmdbd: there `sacct` says accounting is disabled and submitit never
learns a task's state (it would wait forever on a cancelled one). `SqueueInfoWatcher` asks `squeue --states=all`
instead; a task that left the queue has ended. submitit is imported inside the functions."""
from __future__ import annotations

import subprocess
import time
from typing import Any, Sequence

__all__ = ["ACTIVE_STATES", "install_squeue_watcher", "task_states"]


# squeue's long state names of a task that has not ended (UNKNOWN: not seen yet)
ACTIVE_STATES = frozenset({"PENDING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING",
                           "COMPLETING", "RESIZING", "SUSPENDED", "STOPPED", "SIGNALING", "STAGE_OUT", "PREEMPTED",
                           "RESV_DEL_HOLD", "UNKNOWN", "READY"})
GONE = "LEFT_QUEUE"  # no longer listed by squeue (past MinJobAge): it has ended


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
