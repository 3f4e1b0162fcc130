"""Smoke tests of the throwaway single-node Slurm cluster (tests/slurm_cluster.py) and of submitit against it.

Skipped when Debian's Slurm/MUNGE binaries are absent (apt-get install --no-install-recommends slurm-wlm munge); the
submitit tests are skipped when submitit is not installed. About 25 s on 2 cores.
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from slurm_cluster import INSTALL_HINT, SlurmCluster, SlurmClusterError, missing_binaries  # noqa: E402

_MISSING = missing_binaries()
pytestmark = pytest.mark.skipif(
    bool(_MISSING), reason=f"Slurm/MUNGE binaries not installed ({', '.join(_MISSING)}); {INSTALL_HINT}"
)
SECRET = "s3cr3t-Pa55word-for-tests"


@pytest.fixture(scope="module")
def cluster():
    with SlurmCluster() as c:
        yield c
    assert c.stray_processes() == []


@pytest.fixture()
def slurm_env(cluster, monkeypatch):
    """os.environ pointing at the cluster (submitit runs sbatch/squeue/scancel with the process environment)."""
    for k in list(os.environ):
        if k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_")):
            monkeypatch.delenv(k)
    for k, v in cluster.env.items():
        monkeypatch.setenv(k, v)
    return cluster


def _wait_for(pred, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.1)


# ------------------------------------------------------------------------------------------------ the harness
def test_missing_binaries_message(monkeypatch):
    import slurm_cluster

    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.setattr(slurm_cluster, "SBIN_DIRS", ())
    with pytest.raises(SlurmClusterError, match="slurmctld.*apt-get install"):
        SlurmCluster().start()


def test_start_stop_leaves_nothing(tmp_path):
    c = SlurmCluster(base_dir=tmp_path)
    with c:
        folder = c.dir
        assert c.running and c.startup_s < 15
        assert Path(c.env["SLURM_CONF"]).is_file()
        daemons = [p.pid for p in c._procs.values()]
        c.sbatch("-o", "/dev/null", "--wrap", "sleep 300")  # still running at stop()
        _wait_for(lambda: len(c.stray_processes()) > len(daemons), 10, "the job's processes")
    assert c.stray_processes() == []
    assert not folder.exists()
    for pid in daemons:
        assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split(")")[1][:3]


def test_sbatch_wrap_and_job_array(cluster, tmp_path):
    out = tmp_path / "hi.txt"
    job = cluster.sbatch("-o", "/dev/null", "--wrap", f"echo hi > {out}")
    array = cluster.sbatch(
        "--array=0-2", "-o", str(tmp_path / "task_%A_%a.out"), "--wrap", 'echo "task $SLURM_ARRAY_TASK_ID"'
    )
    states = cluster.wait_for_jobs(job, array, timeout=30)
    assert states == {job: "COMPLETED", **{f"{array}_{i}": "COMPLETED" for i in range(3)}}
    assert out.read_text() == "hi\n"
    for i in range(3):
        assert (tmp_path / f"task_{array}_{i}.out").read_text() == f"task {i}\n"
    assert cluster.squeue(job, array) == []  # finished jobs leave the queue
    assert dict(cluster.squeue(job, array, all_states=True))[f"{array}_1"] == "COMPLETED"


def test_scancel_running_array_task(cluster):
    array = cluster.sbatch("--array=0-2", "-o", "/dev/null", "--wrap", "sleep 120")
    cluster.wait_for_state(f"{array}_0", ["RUNNING"], timeout=15)  # 2 CPUs: tasks 0 and 1 run, 2 waits
    cluster.scancel(f"{array}_0")
    assert cluster.wait_for_state(f"{array}_0", ["CANCELLED"], timeout=15) == "CANCELLED"
    queued = dict(cluster.squeue(array))
    assert f"{array}_0" not in queued and queued  # the cancelled task left the queue, the others did not
    rec = cluster.show_job(f"{array}_0")[0]
    assert rec["JobState"] == "CANCELLED" and rec["ExitCode"] == "0:15"  # killed by SIGTERM
    cluster.scancel(array)
    states = cluster.wait_for_jobs(array, timeout=15)
    assert set(states.values()) == {"CANCELLED"}
    assert cluster.squeue(array) == []


def test_requeue_and_show_job(cluster, tmp_path, monkeypatch):
    log = tmp_path / "runs.log"
    script = f"""#!/bin/bash
echo "run restart=${{SLURM_RESTART_COUNT:-0}} secret=$CUSHING_TEST_SECRET" >> {log}
if [ "${{SLURM_RESTART_COUNT:-0}}" = 0 ]; then sleep 120; fi
"""
    monkeypatch.setenv("CUSHING_TEST_SECRET", SECRET)  # exported to the job by sbatch's default --export=ALL
    job = cluster.sbatch("--requeue", "-o", "/dev/null", "--job-name=requeue-me", script=script)
    cluster.wait_for_state(job, ["RUNNING"], timeout=15)
    _wait_for(lambda: log.exists(), 10, "the first run")
    cluster.requeue(job)
    rec = cluster.show_job(job)[0]
    assert rec["Restarts"] == "1" and rec["Requeue"] == "1"
    assert rec["JobState"] in ("PENDING", "COMPLETING", "REQUEUED")  # then PENDING (Reason=BeginTime)
    assert cluster.wait_for_jobs(job, timeout=30) == {job: "COMPLETED"}  # ran again after cred_expire
    assert log.read_text().splitlines() == [f"run restart=0 secret={SECRET}", f"run restart=1 secret={SECRET}"]

    text = cluster.show_job_text(job)  # scontrol -dd show job: no environment, no batch script
    assert "JobState=COMPLETED" in text and "Restarts=1" in text and "JobName=requeue-me" in text
    assert SECRET not in text
    assert "ExitCode=0:0" in text
    # a job submitted with --no-requeue cannot be requeued
    nj = cluster.sbatch("--no-requeue", "-o", "/dev/null", "--wrap", "sleep 60")
    cluster.wait_for_state(nj, ["RUNNING"], timeout=15)
    with pytest.raises(SlurmClusterError, match="requeue"):
        cluster.requeue(nj)
    cluster.scancel(nj)
    cluster.wait_for_jobs(nj, timeout=15)


# ------------------------------------------------------------------------------------------------ submitit
def test_submitit_job_array(slurm_env, tmp_path, monkeypatch):
    submitit = pytest.importorskip("submitit", reason="submitit is not installed (pip install submitit)")
    monkeypatch.setenv("CUSHING_TEST_SECRET", SECRET)

    def square(x):
        import os

        env = os.environ
        return x * x, env.get("SLURM_ARRAY_TASK_ID"), env.get("CUSHING_TEST_SECRET"), env.get("SUBMITIT_EXECUTOR")

    assert submitit.AutoExecutor(folder=tmp_path / "auto").cluster == "slurm"  # picked because `srun` is on PATH
    ex = submitit.AutoExecutor(folder=tmp_path / "%j", cluster="slurm")
    ex.update_parameters(timeout_min=5, slurm_partition=slurm_env.partition, cpus_per_task=1, name="cushing-test")
    jobs = ex.map_array(square, [1, 2, 3])
    array_id = jobs[0].job_id.split("_")[0]
    assert [j.job_id for j in jobs] == [f"{array_id}_{i}" for i in range(3)]
    results = [j.result() for j in jobs]  # polls for the result pickle; does not need sacct
    assert results == [(1, "0", SECRET, "slurm"), (4, "1", SECRET, "slurm"), (9, "2", SECRET, "slurm")]
    submission = (tmp_path / array_id / f"{array_id}_submission.sh").read_text()
    assert "#SBATCH --array=0-2%3" in submission and "srun --unbuffered" in submission
    assert SECRET not in slurm_env.show_job_text(array_id)
    # a task's result pickle is written before its step ends: read the states once every task has ended
    assert set(slurm_env.wait_for_jobs(array_id, timeout=30).values()) == {"COMPLETED"}


def test_submitit_cancelled_task_without_sacct(slurm_env, tmp_path, monkeypatch):
    submitit = pytest.importorskip("submitit", reason="submitit is not installed (pip install submitit)")
    from submitit.slurm.slurm import SlurmJob

    def sleepy(x):
        import time

        time.sleep(120)
        return x

    ex = submitit.SlurmExecutor(folder=tmp_path / "%j")
    ex.update_parameters(time=5, partition=slurm_env.partition)
    jobs = ex.map_array(sleepy, [0, 1])
    _wait_for(lambda: all(s == "RUNNING" for s in slurm_env.job_states(jobs[0].job_id.split("_")[0]).values()),
              20, "both tasks running")
    jobs[1].cancel()  # scancel ARRAY_1: submitit's job ignores SIGTERM, SIGKILL follows after KillWait
    slurm_env.wait_for_state(jobs[1].job_id, ["CANCELLED"], timeout=20)

    # stock watcher: sacct fails, the state stays UNKNOWN and done() never turns True for a task without a result
    assert not jobs[1].done(force_check=True)
    assert jobs[1].state == "UNKNOWN"

    from cushing.workflows.cluster import has_accounting, follow_with_squeue

    stock = SlurmJob.watcher
    assert not has_accounting()  # no slurmdbd here: sacct cannot answer
    follow_with_squeue(jobs, delay_s=60)  # these jobs only: submitit's class-wide watcher is left as it is
    assert SlurmJob.watcher is stock and all(j.watcher is not stock for j in jobs)
    assert jobs[1].done(force_check=True)
    assert jobs[1].state == "CANCELLED" and jobs[0].state == "RUNNING"
    jobs[1]._results_timeout_s = 0  # result() waits that long for a result pickle before giving up
    with pytest.raises(submitit.core.utils.UncompletedJobError, match="state: CANCELLED"):
        jobs[1].result()
    jobs[0].cancel()
    slurm_env.wait_for_jobs(jobs[0].job_id, timeout=20)


def test_submitit_preempted_task_is_requeued(slurm_env, tmp_path):
    submitit = pytest.importorskip("submitit", reason="submitit is not installed (pip install submitit)")

    def attempt(folder):
        import os
        import pathlib
        import time

        d = pathlib.Path(folder)
        n = len(list(d.glob("attempt-*")))
        (d / f"attempt-{n}").write_text(os.environ.get("SLURM_RESTART_COUNT", "0"))
        if n == 0:
            time.sleep(120)  # preempted here
        return n, os.environ.get("SLURM_RESTART_COUNT")

    marks = tmp_path / "marks"
    marks.mkdir()
    ex = submitit.AutoExecutor(folder=tmp_path / "%j", cluster="slurm")
    # timeout_min must exceed 10: submitit calls a USR2 a time-out (never requeued unless the function is
    # Checkpointable) once the run exceeds min(0.8 * limit, limit - 10 min), which is < 0 for limits under 10 min
    ex.update_parameters(timeout_min=60, slurm_partition=slurm_env.partition)
    job = ex.submit(attempt, str(marks))
    _wait_for(lambda: (marks / "attempt-0").exists(), 20, "the first attempt")
    time.sleep(0.5)  # let submitit's signal handlers be in place (they are installed before the function runs)
    # what job._interrupt() sends for a preemption (TERM, then USR2; submitit requeues with `scontrol requeue`), with
    # USR2 sent once TERM is handled: two scancel calls may land in either order, and a late TERM kills the scontrol
    slurm_env.run("scancel", "--signal=TERM", job.job_id)
    _wait_for(lambda: "Bypassing signal SIGTERM" in (job.stdout() or "") + (job.stderr() or ""), 15, "TERM handled")
    slurm_env.run("scancel", "--signal=USR2", job.job_id)
    _wait_for(lambda: slurm_env.show_job(job.job_id)[0]["Restarts"] == "1", 15, "the requeue")
    deadline = time.monotonic() + 30
    while not job.done():
        assert time.monotonic() < deadline, slurm_env.show_job(job.job_id)
        time.sleep(0.5)
    assert job.result() == (1, "1")
    assert "this job is preempted" in job.stderr() and "DUE TO JOB REQUEUE" in job.stderr()
    assert f"Requeued job {job.job_id}" in job.stdout()  # submitit's INFO lines go to stdout
