"""Sweeps on a cluster (cushing/cluster.py, deploy/k8s).

Unit: the refusals (embedded stores, a loopback address the nodes cannot reach, no sbatch, world-readable secret
files), the options and the #SBATCH lines they make, the preemption handler, the secrets file, the job's
environment. The Kubernetes template: parsed; `kubectl kustomize`; `kubectl apply --dry-run=client` where kubectl
reaches an API server (a client-side dry run still asks one for the resource types).

End to end on a real Slurm 22.05 (tests/slurm_cluster.py: slurmctld + slurmd + munged as local processes) and the
local PostgreSQL + MLflow stack: a three-configuration study with `--launcher slurm --array 3 --wait`, one task
scancelled mid-training. About 2 minutes on 2 cores.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from cushing.workflows import cluster
from cushing.workflows.cluster import secrets as cluster_secrets
from cushing.workflows.cluster import task as cluster_task
from cushing.workflows.cluster import ClusterError, SlurmOptions, launch_checks
from tests.conftest import ROOT, env_vars, fresh_database

sys.path.insert(0, str(Path(__file__).resolve().parent))
from slurm_cluster import INSTALL_HINT, SlurmCluster, missing_binaries  # noqa: E402

K8S = ROOT / "deploy" / "k8s"
REMOTE = [("gpu01", "gpu01", "10.0.0.11"), ("gpu02", "gpu02", "10.0.0.12")]
HERE = {"vm", "localhost", "127.0.0.1"}


def _checks(**kw):
    args = {"tracking_uri": "http://mlflow.example:5000", "storage": "postgresql://optuna@db.example/optuna",
            "sbatch": "/usr/bin/sbatch", "srun": "/usr/bin/srun", "compute_hosts": REMOTE, "local_names": HERE}
    return launch_checks(**{**args, **kw})


# ------------------------------------------------------------------------------------------------ refusals

def test_a_shared_setup_passes():
    assert _checks() == cluster.Preflight((), ())


def test_embedded_stores_and_missing_sbatch_are_refused_together():
    found = _checks(tracking_uri="sqlite:////home/u/mlflow.db", storage="sqlite:////home/u/optuna.db", sbatch=None,
                    srun=None)
    text = "\n".join(found.problems)
    assert len(found.problems) == 3, text
    assert "no sbatch and srun found" in text and "--launcher local" in text
    assert "embedded store" in text and "MLFLOW_TRACKING_URI" in text
    assert "SQLite file on this host" in text and "postgresql://" in text
    assert _checks(tracking_uri="file:///home/u/mlruns").problems  # MLflow's file store is as local


@pytest.mark.parametrize("field,url", [("tracking_uri", "http://127.0.0.1:5000"),
                                       ("tracking_uri", "http://localhost:5000"),
                                       ("storage", "postgresql+psycopg2://optuna@127.0.0.1:5432/optuna"),
                                       ("storage", "postgresql://optuna:pw@[::1]/optuna")])
def test_loopback_refused_for_other_nodes_and_a_warning_when_slurm_is_this_host(field, url):
    off = _checks(**{field: url})
    assert len(off.problems) == 1 and "loopback" in off.problems[0] and "gpu01, gpu02" in off.problems[0]
    assert "pw" not in off.problems[0]  # a password in the URL is not echoed
    on = _checks(**{field: url}, compute_hosts=[("vm", "vm", "127.0.0.1")])
    assert on.problems == () and len(on.warnings) == 1 and "fine while Slurm's nodes are this host" in on.warnings[0]
    unknown = _checks(**{field: url}, compute_hosts=None)
    assert unknown.problems and "sinfo could not list them" in unknown.problems[0]


def test_secret_files_must_be_private(tmp_path):
    loose, tight = tmp_path / "pgpass", tmp_path / "secrets.env"
    loose.write_text("db:5432:*:optuna:pw\n")
    loose.chmod(0o644)
    tight.write_text("MLFLOW_TRACKING_PASSWORD=x\n")
    tight.chmod(0o600)
    found = _checks(private_files={"PGPASSFILE": str(loose), "CUSHING_SECRETS_FILE": str(tight)})
    assert found.problems == (f"PGPASSFILE={loose} has mode 644: other accounts can read it; chmod 600 {loose}",)
    assert "no such file" in _checks(private_files={"PGPASSFILE": str(tmp_path / "nope")}).problems[0]
    warned = _checks(secrets_in_env=["MLFLOW_TRACKING_PASSWORD"]).warnings
    assert len(warned) == 1 and "CUSHING_SECRETS_FILE" in warned[0] and "scontrol show job` does not" in warned[0]


def test_the_cli_refuses_before_writing_anything(tmp_path, monkeypatch, capsys):
    from cushing.cli import main

    monkeypatch.chdir(tmp_path)
    for k in ("MLFLOW_TRACKING_URI", "CUSHING_OPTUNA_STORAGE", "MLFLOW_RUN_ID"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch, no srun
    sigterm = signal.getsignal(signal.SIGTERM)  # main() installs its own
    try:
        assert main(["sweep", str(ROOT / "projects" / "demo.yaml"), "--launcher", "slurm", "--wait"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("cushing sweep: refusing to submit to Slurm:")
        assert "no sbatch and srun" in err and "embedded store" in err and "SQLite file on this host" in err
        assert list(tmp_path.iterdir()) == [], "nothing is written before the refusal"
        assert main(["tune", str(ROOT / "projects" / "tune_vit.yaml"), "--launcher", "slurm"]) == 2
        assert "cushing tune: refusing to submit to Slurm:" in capsys.readouterr().err
        assert main(["sweep", str(ROOT / "projects" / "demo.yaml"), "--launcher", "slurm", "--workers", "2"]) == 2
        assert "use --array N" in capsys.readouterr().err
    finally:
        signal.signal(signal.SIGTERM, sigterm)


# ------------------------------------------------------------------------------------------------ options

@pytest.mark.parametrize("text,minutes", [("90", 90), ("30:30", 31), ("2:00:00", 120), ("1-0", 1440),
                                          ("1-12:30", 2190), ("0-00:00:59", 1), ("", None)])
def test_slurm_time_formats(text, minutes):
    assert cluster.parse_time(text) == minutes


@pytest.mark.parametrize("bad", ["export=ALL,PW=x", "array=0-9", "output=/tmp/x", "signal=USR1@60", "qos=a\nb",
                                 "=x", "Bad Key=1"])
def test_sbatch_options_the_launcher_owns_or_that_leak_are_refused(bad):
    with pytest.raises(ClusterError, match="bad --slurm-option"):
        cluster.parse_sbatch_options([bad])


def test_options_validate_and_size_the_array():
    assert cluster.parse_sbatch_options(["qos=high", "--exclusive", "exclude=n1,n2"]) == {
        "qos": "high", "exclusive": True, "exclude": "n1,n2"}
    with pytest.raises(ClusterError, match="array: a positive whole number"):
        SlurmOptions(array=0)
    with pytest.raises(ClusterError, match="partition: 'gpu; rm' is not a Slurm name"):
        SlurmOptions(partition="gpu; rm")
    assert SlurmOptions().tasks_for(23) == 23 and SlurmOptions(max_parallel=4).tasks_for(23) == 4
    assert SlurmOptions(array=3, max_parallel=2).tasks_for(23) == 3 and SlurmOptions(max_parallel=2).at_once(3) == 2


def test_the_sbatch_script_carries_the_options_and_requeue(tmp_path):
    pytest.importorskip("submitit", reason="submitit is not installed (pip install submitit==1.5.4)")
    from submitit.slurm.slurm import _make_sbatch_string

    opts = SlurmOptions(partition="gpu", account="lab", time_min=120, gpus_per_task=1, cpus_per_task=8, mem_gb=16,
                        max_parallel=2, extra=("qos=high",))
    text = _make_sbatch_string(command="python -u -m submitit.core._submit /x", folder=tmp_path, map_count=3,
                               **cluster.sbatch_parameters(opts, "cushing-sweep-demo", 3))
    for line in ("--array=0-2%2", "--partition=gpu", "--account=lab", "--time=120", "--gpus-per-task=1",
                 "--cpus-per-task=8", "--mem=16G", "--qos=high", "--requeue", "--signal=USR2@90",
                 "--job-name=cushing-sweep-demo"):
        assert f"#SBATCH {line}\n" in text, line
    no = cluster.sbatch_parameters(SlurmOptions(requeue=False, mem_gb=1.5), "x", 1)
    assert no["additional_parameters"] == {"no-requeue": True} and no["mem"] == "1536M"


# ------------------------------------------------------------------------------------------------ task side

@pytest.mark.parametrize("submitit_does,raised", [(SystemExit(-1), SystemExit), (RuntimeError("timed-out"), RuntimeError)])
def test_preemption_is_a_cooperative_stop_then_submitit_requeues(submitit_does, raised, monkeypatch):
    """USR2 only asks the task to stop: nothing is raised from the signal (submitit's own handler, which requeues
    and exits, is not called there). The worker stops at its next safe point, then submitit's handler runs from the
    task's code: requeued (SystemExit) or, out of requeues, an error."""
    from cushing import stops

    calls, seen = [], {}

    def submitit_handler(signum, frame):  # submitit: requeue then sys.exit(-1), or UncompletedJobError
        calls.append(signum)
        raise submitit_does

    def training(task, storage):  # the signal lands mid-training; the next safe point stops it
        os.kill(os.getpid(), signal.SIGUSR2)  # raises nothing here
        time.sleep(0.2)
        seen.update(requested=stops.requested(), calls=list(calls))
        stops.check()
    old = signal.signal(signal.SIGUSR2, submitit_handler)
    monkeypatch.setenv("CUSHING_OPTUNA_STORAGE", "sqlite:///unused.db")
    monkeypatch.setattr(cluster_task, "_sweep_task", training)
    stops.reset()
    try:
        with pytest.raises(raised):
            cluster.run_array_task(cluster.ArrayTask("sweep", "/shared/study.yaml", "0" * 32), 0)
        assert seen == {"requested": "SIGUSR2", "calls": []}, "submitit's handler is not called from the signal"
        assert calls == [signal.SIGUSR2]
    finally:
        signal.signal(signal.SIGUSR2, old)
        stops.reset()


def test_a_task_at_its_time_limit_is_requeued_as_a_fresh_worker():
    pytest.importorskip("submitit", reason="submitit is not installed (pip install submitit==1.5.4)")
    task = cluster.ArrayTask("sweep", "/shared/study.yaml", "0" * 32)
    again = cluster.ArrayWorker().checkpoint(task, 2)  # submitit's hook: what to run when requeued
    assert isinstance(again.function, cluster.ArrayWorker) and again.args == (task, 2)


def test_secrets_file_and_the_job_environment(tmp_path, monkeypatch):
    f = tmp_path / "secrets.env"
    f.write_text("# lab credentials\nexport MLFLOW_TRACKING_PASSWORD='s3cret pw'\nPGPASSWORD=x\n")
    f.chmod(0o644)
    with pytest.raises(ClusterError, match="chmod 600"):
        cluster.read_secrets_file(f)
    f.chmod(0o600)
    assert cluster.read_secrets_file(f) == {"MLFLOW_TRACKING_PASSWORD": "s3cret pw", "PGPASSWORD": "x"}
    monkeypatch.setenv("CUSHING_SECRETS_FILE", str(f))
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "s3cret pw")
    monkeypatch.setenv("MLFLOW_RUN_ID", "abc")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example:5000")
    monkeypatch.setenv("PYTHONPATH", "/elsewhere")
    before = dict(os.environ)
    with cluster_secrets._job_environment("postgresql://optuna@db.example/optuna"):
        assert os.environ["CUSHING_OPTUNA_STORAGE"] == "postgresql://optuna@db.example/optuna"
        assert "MLFLOW_TRACKING_PASSWORD" not in os.environ and "MLFLOW_RUN_ID" not in os.environ
        assert os.environ["PYTHONPATH"] == f"{ROOT}{os.pathsep}/elsewhere"
    assert dict(os.environ) == before


# ------------------------------------------------------------------------------------------------ Kubernetes

def _k8s_docs() -> dict[str, dict]:
    docs = {}
    for f in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(f.read_text()):
            docs[f"{f.name}:{doc['kind']}"] = doc
    return docs


def test_k8s_template_is_an_indexed_job_of_sweep_workers_with_secrets_from_a_secret():
    docs = _k8s_docs()
    job, secret = docs["sweep-job.yaml:Job"], docs["secret.example.yaml:Secret"]
    spec = job["spec"]
    assert job["apiVersion"] == "batch/v1" and spec["completionMode"] == "Indexed"
    assert spec["completions"] == spec["parallelism"] >= 1
    (worker,) = spec["template"]["spec"]["containers"]
    cmd = worker["command"]
    assert cmd[:4] == ["python", "-m", "cushing", "sweep"] and "--worker" in cmd
    assert (ROOT / cmd[4]).is_file(), "the study file the image carries"
    env = {e["name"]: e for e in worker["env"]}
    assert env["MLFLOW_TRACKING_URI"]["value"] == "http://mlflow:5000"  # the compose service's name
    for name in ("MLFLOW_TRACKING_PASSWORD", "CUSHING_OPTUNA_STORAGE", "MLFLOW_TRACKING_USERNAME"):
        ref = env[name]["valueFrom"]["secretKeyRef"]
        assert "value" not in env[name] and ref["name"] == secret["metadata"]["name"]
        assert ref["key"] in secret["stringData"]
    for e in worker["env"]:
        assert "value" not in e or not re.search(r"PASSWORD|TOKEN|SECRET|STORAGE", e["name"]), e
    assert all("CHANGE-ME" in v for k, v in secret["stringData"].items() if k != "mlflow-username")
    assert docs["kustomization.yaml:Kustomization"]["resources"] == ["sweep-job.yaml"]
    readme = (K8S / "README.md").read_text()
    assert "secretKeyRef" in readme and "parent run" in readme.lower() and "Tables II and III" in readme


def _kubectl_or_skip() -> str:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed: the Kubernetes template is checked by parsing only")
    return kubectl


def test_k8s_template_builds_with_kustomize():
    kubectl = _kubectl_or_skip()
    r = subprocess.run([kubectl, "kustomize", str(K8S)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert [d["kind"] for d in yaml.safe_load_all(r.stdout)] == ["Job"]


def test_k8s_template_passes_kubectl_client_dry_run():
    kubectl = _kubectl_or_skip()
    files = [str(K8S / "sweep-job.yaml"), str(K8S / "secret.example.yaml")]
    r = subprocess.run([kubectl, "apply", "--dry-run=client", "--request-timeout=10s",
                        *(a for f in files for a in ("-f", f))], capture_output=True, text=True, timeout=120)
    offline = re.search(r"connection refused|unable to recognize|failed to download openapi|no configuration has "
                        r"been provided|Unable to connect", r.stderr)
    if r.returncode != 0 and offline:
        pytest.skip(f"kubectl reaches no API server ({offline.group(0)}); a client-side dry run still asks one for "
                    "the resource types, so the template is checked by parsing and `kubectl kustomize` only")
    assert r.returncode == 0, r.stderr
    assert "job.batch/cushing-sweep-paper created (dry run)" in r.stdout
    assert "secret/cushing-secrets created (dry run)" in r.stdout


# ------------------------------------------------------------------------------------------------ real Slurm

_MISSING = missing_binaries()
# `a` and `b` are taken first (the queue keeps the file's order) and train long enough (30 epochs) for a scancel (whose
# SIGKILL follows KillWait, 2 s, later) and a preemption to land mid-training; `c` is short
LONG = 30
CONFIGS = [{"model": "resnet18", "label": "a", "epochs": LONG},
           {"model": "resnet18", "label": "b", "epochs": LONG, "lr": 0.01},
           {"model": "resnet18", "label": "c", "batch_size": 16}]


def _study(tmp_path: Path) -> Path:
    path = tmp_path / "slurm-e2e.yaml"
    path.write_text(yaml.safe_dump({
        "name": "slurm-e2e", "kind": "sweep", "experiment": "slurm-e2e",
        "base": {"data": "demo", "pretrained": False, "epochs": 3, "img_size": 32, "bootstrap": 0, "cam": False,
                 "log_model": False, "checkpoint_every": 0, "oversample": 1, "aug_strength": 0.0},
        "configurations": CONFIGS}))
    return path


class _Output:
    """The launcher's merged stdout/stderr, read as it comes."""

    def __init__(self, proc: subprocess.Popen):
        self.lines: list[str] = []
        self.thread = threading.Thread(target=lambda: self.lines.extend(iter(proc.stdout.readline, "")), daemon=True)
        self.thread.start()

    @property
    def text(self) -> str:
        return "".join(self.lines)

    def wait_for(self, pattern: str, proc: subprocess.Popen, timeout: float) -> re.Match:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = re.search(pattern, self.text)
            if found:
                return found
            assert proc.poll() is None, f"the launcher exited ({proc.returncode}):\n{self.text[-4000:]}"
            time.sleep(0.5)
        pytest.fail(f"no {pattern!r} in the launcher's output after {timeout} s:\n{self.text[-4000:]}")


def _logged(path: Path, text: str, timeout: float) -> None:
    """Wait until a task's log holds `text` (a signal its job handled, say)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.is_file() and text in path.read_text(errors="replace"):
            return
        time.sleep(0.2)
    pytest.fail(f"{path.name} did not log {text!r} within {timeout} s")


def _training(storage: str, label: str, timeout: float = 150.0):
    """(study name, MLflow run, worker) of `label`'s first trial, a second into its training (its MLflow run open;
    epochs are logged asynchronously, so waiting for a logged epoch could be too late on a fast machine)."""
    import mlflow
    import optuna

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        names = [s for s in optuna.get_all_study_names(storage) if s.startswith("sweep:slurm-e2e:")]
        trials = optuna.load_study(study_name=names[0], storage=storage).get_trials(deepcopy=False) if names else []
        for t in trials:
            run = t.user_attrs.get("mlflow_run_id")
            if t.user_attrs.get("label") != label or not run:
                continue
            time.sleep(1.0)
            assert mlflow.MlflowClient().get_run(run).info.status == "RUNNING", f"{label} ended before it was stopped"
            return names[0], run, t.user_attrs["worker"]  # its host:pid
        time.sleep(0.3)
    pytest.fail(f"{label} did not start training within {timeout} s")


ON_SLURM = pytest.mark.skipif(bool(_MISSING), reason=f"Slurm/MUNGE binaries not installed "
                                                     f"({', '.join(_MISSING)}); {INSTALL_HINT}")


@pytest.fixture(scope="module")
def slurm():
    """One throwaway single-node cluster for the module's end-to-end tests."""
    pytest.importorskip("submitit", reason="submitit is not installed (pip install submitit==1.5.4)")
    with SlurmCluster() as c:
        yield c
    assert c.stray_processes() == []


def _launcher_env(slurm, pg_stack, storage: str) -> dict[str, str]:
    env = slurm.environ({**os.environ, **pg_stack.env(), "CUSHING_OPTUNA_STORAGE": storage,
                         "CUSHING_HEARTBEAT_S": "2", "CUSHING_GRACE_S": "6", "PYTHONUNBUFFERED": "1",
                         "OMP_NUM_THREADS": "1"})  # two tasks at once share the 2 cores without thrashing
    env.pop("MLFLOW_RUN_ID", None)
    return env


@pytest.mark.slow
@pytest.mark.postgres
@pytest.mark.slurm
@ON_SLURM
def test_sweep_on_slurm_retries_cancelled_and_preempted_tasks(tmp_path, pg_stack, demo_manifest, slurm):
    import mlflow
    import optuna

    storage = fresh_database(pg_stack, "optuna_slurm")
    secrets = [pg_stack.admin_password, pg_stack.mlflow_db_password, pg_stack.optuna_db_password,
               pg_stack.pg.superuser_password]
    logs = tmp_path / "slurm-logs"
    env = _launcher_env(slurm, pg_stack, storage)
    cmd = [sys.executable, "-m", "cushing", "sweep", str(_study(tmp_path)), "--launcher", "slurm", "--array", "3",
           "--wait"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    out = _Output(proc)
    try:
        array = out.wait_for(r"submitted Slurm job array (\d+): 3 task", proc, 120).group(1)
        with env_vars(pg_stack.env()):
            study_name, a_run, a_owner = _training(storage, "a")
            cancelled = cluster.worker_tasks(logs, array)[a_owner]
            slurm.scancel(cancelled)  # SIGTERM (ignored by submitit's job), SIGKILL after KillWait
            _, b_run, b_owner = _training(storage, "b")
            preempted = cluster.worker_tasks(logs, array)[b_owner]
            # what Slurm sends a preempted job (as submitit's own _interrupt): TERM, then USR2 once TERM is handled
            # (two scancel calls may be delivered in either order: a late TERM kills the requeue's own scontrol)
            slurm.run("scancel", "--signal=TERM", preempted)
            _logged(logs / f"{preempted}_0_log.out", "Bypassing signal SIGTERM", 60)
            slurm.run("scancel", "--signal=USR2", preempted)
        proc.wait(timeout=400)
    finally:
        if proc.poll() is None:
            proc.kill()
        out.thread.join(10)
    text = out.text
    assert proc.returncode == 0, text[-5000:]
    states = slurm.job_states(array)
    restarts = slurm.show_job(preempted)[0]["Restarts"]
    queue = slurm.squeue(array)
    scontrol = slurm.show_job_text(array)

    # the launcher: job id, per-configuration and per-task progress, the cancellation seen, the tables
    assert "Traceback" not in text, text[-5000:]
    assert re.search(rf"\[slurm {array}\] configuration 1/3 a: its worker \(task {cancelled}\) stopped beating",
                     text), text[-5000:]
    assert re.search(rf"configuration 2/3 b: stopped on task {preempted} \(Stopped: SIGUSR2", text), text[-5000:]
    for i, label in ((1, "a"), (2, "b")):
        assert re.search(rf"configuration {i}/3 {label}: training on task {array}_\d \(retry of trial \d+\)", text), \
            text[-5000:]
    assert re.search(rf"\[slurm {array}\] 3/3 configurations done, 0 training; tasks: ", text)
    assert "Table II" in text and "Table III" in text
    # Slurm: the cancelled task CANCELLED, the preempted one requeued, nothing left in the queue, no password shown
    assert states[cancelled] == "CANCELLED" and all(s in ("COMPLETED", "CANCELLED") for s in states.values()), states
    assert restarts == "1"
    task_log = (logs / f"{preempted}_0_log.out").read_text()
    assert "this job is preempted" in task_log and f"Requeued job {preempted}" in task_log
    assert queue == []
    for pw in secrets:
        assert pw not in scontrol
        for f in logs.rglob("*"):  # submission script, pickles, task logs
            assert not f.is_file() or pw.encode() not in f.read_bytes(), f
    # Optuna: one COMPLETE trial per configuration, plus the cancelled and the preempted attempts, FAILED and retried
    with env_vars(pg_stack.env()):
        trials = optuna.load_study(study_name=study_name, storage=storage).get_trials(deepcopy=False)
        c = mlflow.MlflowClient()
        runs = c.search_runs([c.get_experiment_by_name("slurm-e2e").experiment_id], max_results=100)
        parent = next(r for r in runs if r.data.tags.get("task") == "sweep")
        logged = {a.path for a in c.list_artifacts(parent.info.run_id)}
    complete = sorted(t.user_attrs["label"] for t in trials if t.state.name == "COMPLETE")
    assert complete == ["a", "b", "c"], [(t.number, t.user_attrs, t.state.name) for t in trials]
    failed = {t.user_attrs["label"]: t for t in trials if t.state.name == "FAIL" and "label" in t.user_attrs}
    assert sorted(failed) == ["a", "b"] and len([t for t in trials if "label" in t.user_attrs]) == 5
    assert "interrupted" not in failed["a"].user_attrs  # SIGKILLed: found by its stale heartbeat
    assert failed["b"].user_attrs["interrupted"].startswith("Stopped: SIGUSR2")  # marked at once, retried at once
    # MLflow: one FINISHED child per configuration under the one parent; the stopped ones FAILED / KILLED, tagged
    kids = {r.info.run_id: r for r in runs if r.data.tags.get("sweep_config")}
    assert all(r.data.tags.get("mlflow.parentRunId") == parent.info.run_id for r in kids.values())
    assert sorted(r.data.tags["sweep_config"] for r in kids.values() if r.info.status == "FINISHED") == ["a", "b", "c"]
    assert kids[a_run].info.status == "FAILED" and "cushing.died" in kids[a_run].data.tags
    assert kids[b_run].info.status == "KILLED"
    with env_vars(pg_stack.env()):
        for run in (a_run, b_run):  # stopped mid-training: fewer epochs logged than it trains, no final result
            c = mlflow.MlflowClient()
            assert len(c.get_metric_history(run, "epoch/val/f1")) < LONG
            assert "test/f1" not in c.get_run(run).data.metrics
    assert len(kids) == 5 and {"table2.csv", "table3.csv"} <= logged
    assert len([r for r in runs if r.data.tags.get("task") == "sweep"]) == 1


@pytest.mark.slow
@pytest.mark.postgres
@pytest.mark.slurm
@ON_SLURM
def test_tune_on_slurm_shares_the_trials_between_tasks(tmp_path, pg_stack, demo_manifest, slurm):
    import mlflow
    import optuna

    study = tmp_path / "slurm-tune.yaml"
    study.write_text(yaml.safe_dump({
        "name": "slurm-tune", "kind": "tune", "experiment": "slurm-tune", "n_trials": 4,
        "base": {"model": "resnet18", "data": "demo", "pretrained": False, "epochs": 2, "img_size": 32,
                 "bootstrap": 0, "cam": False, "log_model": False, "checkpoint_every": 0, "oversample": 1,
                 "aug_strength": 0.0},
        "sampler": {"type": "random", "seed": 0}, "pruner": {"type": "none"},
        "space": {"lr": {"type": "float", "low": 0.001, "high": 0.1, "log": True}}}))
    storage = fresh_database(pg_stack, "optuna_slurm_tune")
    r = subprocess.run([sys.executable, "-m", "cushing", "tune", str(study), "--launcher", "slurm", "--array", "2",
                        "--wait"], cwd=tmp_path, env=_launcher_env(slurm, pg_stack, storage), capture_output=True,
                       text=True, timeout=400)
    text = r.stdout + r.stderr
    assert r.returncode == 0 and "Traceback" not in text, text[-5000:]
    array = re.search(r"submitted Slurm job array (\d+): 2 task\(s\) x 2 trial\(s\)", text).group(1)
    assert f"[slurm {array}] trial 4/4 (study trial" in text and "best value" in text
    assert set(slurm.job_states(array).values()) == {"COMPLETED"} and slurm.squeue(array) == []
    with env_vars(pg_stack.env()):
        (name,) = [s for s in optuna.get_all_study_names(storage) if s.startswith("tune:slurm-tune:")]
        trials = optuna.load_study(study_name=name, storage=storage).get_trials(deepcopy=False)
        c = mlflow.MlflowClient()
        runs = c.search_runs([c.get_experiment_by_name("slurm-tune").experiment_id], max_results=100)
        (parent,) = [r for r in runs if r.data.tags.get("task") == "tune"]
        logged = {a.path for a in c.list_artifacts(parent.info.run_id)}
    assert [t.state.name for t in trials] == ["COMPLETE"] * 4
    kids = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(kids) == 4 and all(k.info.status == "FINISHED" for k in kids)
    assert {"best_params.json", "trials.csv", "param_importances.csv"} <= logged
