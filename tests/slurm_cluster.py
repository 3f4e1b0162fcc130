"""A throwaway single-node Slurm cluster run as local processes, for tests.

Needs Debian's Slurm 22.05 and MUNGE binaries (`apt-get install --no-install-recommends slurm-wlm munge`, which pulls
slurmctld, slurmd, slurm-client, slurm-wlm-basic-plugins, libmunge2, libhwloc15 and liblua5.1-0). No systemd, no
system config: everything (munge key and socket, slurm.conf, state, spool, logs) lives in one temporary folder and
every daemon runs in the foreground as a child of the test process.

    with SlurmCluster() as cluster:
        job = cluster.sbatch("--wrap", "echo hi > /tmp/x")
        cluster.wait_for_jobs(job)
        subprocess.run(["squeue"], env=cluster.environ())  # any Slurm client, with cluster.env

What it configures: a private munged (throwaway key, socket in the folder; Slurm 22.05 has no auth/slurm, so
AuthType=auth/munge with AuthInfo=socket=...), slurmctld and slurmd on 127.0.0.1 with free ports, SlurmctldHost =
`hostname -s` (slurmctld refuses any other name: "This host (...) not a valid controller"), one node (named after
`hostname -s` unless `node_name=` is given; slurmd is started with -N) with NodeAddr=127.0.0.1, partition
`debug`, proctrack/linuxproc, task/none, select/cons_tres (CR_Core), no cgroups, no accounting (so no `sacct`).
Short timers keep tests fast: a 1 s scheduler loop, KillWait=2 and cred_expire=5 (a requeued job becomes eligible
cred_expire seconds after its requeue; Slurm's default is 120 s). Finished jobs stay visible to `scontrol show job`
and `squeue --states=all` for MinJobAge (600 s).

The daemons get SIGTERM if the test process dies (PR_SET_PDEATHSIG; so start the cluster from a thread that outlives
it, e.g. the main thread); job steps (slurmstepd daemonizes) are found and killed by `stop()`.

Clients need only `SLURM_CONF` (see `env`/`environ()`): the munge socket reaches them through AuthInfo in slurm.conf.
Jobs run as the user running the tests (root here: SlurmUser=root).
"""
from __future__ import annotations

import atexit
import ctypes
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Iterable

APT_PACKAGES = ("slurm-wlm", "munge")
INSTALL_HINT = (
    "install them with: apt-get update && DEBIAN_FRONTEND=noninteractive "
    "apt-get install -y --no-install-recommends slurm-wlm munge"
)
DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("munge", "sbatch", "squeue", "scancel", "scontrol", "sinfo", "srun")
SBIN_DIRS = ("/usr/sbin", "/sbin", "/usr/local/sbin")
# job states after which a job record no longer changes (squeue/scontrol long names)
TERMINAL_STATES = frozenset(
    {"COMPLETED", "CANCELLED", "FAILED", "TIMEOUT", "NODE_FAIL", "PREEMPTED", "OUT_OF_MEMORY", "BOOT_FAIL",
     "DEADLINE", "REVOKED", "SPECIAL_EXIT"}
)
# environment variables that would make clients talk to another cluster or change sbatch's defaults
_CLIENT_ENV_PREFIXES = ("SLURM_", "SBATCH_", "SRUN_", "SALLOC_", "SQUEUE_", "SCANCEL_", "SINFO_", "SCONTROL_")


class SlurmClusterError(RuntimeError):
    """The cluster could not be started or a Slurm command failed."""


# the longest base folder whose `slurm-test-XXXXXXXX/munge/munge.socket` fits in sun_path (108 bytes with its NUL)
_MAX_BASE = 107 - len("/slurm-test-XXXXXXXX/munge/munge.socket")


def _which(name: str) -> str | None:
    path = os.environ.get("PATH", os.defpath) + os.pathsep + os.pathsep.join(SBIN_DIRS)
    return shutil.which(name, path=path)


def missing_binaries() -> list[str]:
    """Names of the Slurm/MUNGE executables this harness needs that are not installed."""
    return [b for b in DAEMONS + CLIENTS if _which(b) is None]


def available() -> bool:
    return not missing_binaries()


def slurm_version() -> str:
    """'22.05.8' for Debian 12's slurm-wlm (empty when slurmctld is absent)."""
    exe = _which("slurmctld")
    if exe is None:
        return ""
    out = subprocess.run([exe, "-V"], capture_output=True, text=True, timeout=10).stdout
    return out.split()[-1] if out.split() else ""


def _free_ports(n: int) -> list[int]:
    socks, ports = [], []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in socks:
            s.close()
    return ports


def _die_with_parent() -> None:
    """preexec_fn: the daemon gets SIGTERM when the thread that started it dies (even on SIGKILL of pytest)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def _ancestors() -> set[int]:
    pids, pid = set(), os.getpid()
    while pid > 1:
        pids.add(pid)
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            pid = int(stat.rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            break
    return pids


def parse_scontrol_records(text: str) -> list[dict[str, str]]:
    """Parse `scontrol -o show job` output (one record a line, `Key=Value` pairs) into dicts."""
    records = []
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        rec: dict[str, str] = {}
        # values may contain spaces (Command=... with arguments): split only before ` Key=`
        for part in re.split(r" (?=[A-Za-z][A-Za-z0-9_:/]*=)", line):
            key, _, value = part.partition("=")
            rec.setdefault(key, value)
        records.append(rec)
    return records


class SlurmCluster:
    """A single-node Slurm cluster (munged + slurmctld + slurmd) in a temporary folder.

    Use as a context manager, or call `start()` and `stop()`. After `start()`:
    `env` is what a client needs (`{"SLURM_CONF": ...}`), `environ()` the current environment with it applied and
    other Slurm variables removed; `run()`/`sbatch()`/`squeue()`/`scancel()`/`show_job()`/`job_states()`/
    `wait_for_jobs()`/`wait_for_state()`/`requeue()` drive it. `stop()` cancels every job, stops the daemons, kills
    any job step left behind and removes the folder (`keep=True` keeps it, e.g. to read logs).
    """

    def __init__(
        self,
        base_dir: str | os.PathLike | None = None,
        *,
        cpus: int | None = None,
        real_memory_mb: int | None = None,
        partition: str = "debug",
        node_name: str | None = None,
        cred_expire_s: int = 5,
        start_timeout_s: float = 30.0,
        keep: bool = False,
        extra_conf: Iterable[str] = (),
    ) -> None:
        if cred_expire_s < 5:
            raise ValueError("cred_expire_s must be >= 5: Slurm 22.05 rejects smaller values and falls back to 120 s")
        self.base_dir = Path(base_dir) if base_dir is not None else None
        self.cpus = cpus or min(2, os.cpu_count() or 1)
        self.real_memory_mb = real_memory_mb or self._default_memory_mb()
        self.partition = partition
        # slurmctld refuses to start unless SlurmctldHost is this host's (short) name; the node may be named freely
        self.host = socket.gethostname().split(".")[0]
        self.node_name = node_name or self.host
        self.cred_expire_s = cred_expire_s
        self.start_timeout_s = start_timeout_s
        self.keep = keep
        self.extra_conf = list(extra_conf)
        self.user = pwd.getpwuid(os.getuid()).pw_name
        self.dir: Path | None = None
        self.conf_path: Path | None = None
        self.munge_socket: Path | None = None
        self.ctld_port = self.slurmd_port = 0
        self.startup_s: float | None = None
        self._procs: dict[str, subprocess.Popen] = {}
        self._log_handles: list = []
        self._logs: dict[str, Path] = {}

    # ----------------------------------------------------------------------------------------------- lifecycle
    def __enter__(self) -> "SlurmCluster":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        return bool(self._procs) and all(p.poll() is None for p in self._procs.values())

    def start(self) -> "SlurmCluster":
        if self._procs:
            raise SlurmClusterError("cluster already started")
        missing = missing_binaries()
        if missing:
            raise SlurmClusterError(f"Slurm/MUNGE binaries not found: {', '.join(missing)}; {INSTALL_HINT}")
        t0 = time.monotonic()
        base = self.base_dir
        if base is not None and len(str(base.resolve())) > _MAX_BASE:
            base = None  # the munge socket's path would not fit in a unix socket address (108 bytes): use /tmp
        if base is not None:
            base.mkdir(parents=True, exist_ok=True)
        self.dir = Path(tempfile.mkdtemp(prefix="slurm-test-", dir=base))
        atexit.register(self.stop)
        try:
            self.dir.chmod(0o755)  # munged wants its socket's folders searchable by all
            for sub in ("munge", "state", "spool", "log"):
                (self.dir / sub).mkdir(mode=0o755)
            self._start_munge()
            self._write_conf()
            self._spawn("slurmctld", [_which("slurmctld"), "-D", "-c", "-f", str(self.conf_path)])
            self._spawn("slurmd", [_which("slurmd"), "-D", "-N", self.node_name, "-f", str(self.conf_path)])
            self._wait_node_ready(t0 + self.start_timeout_s)
        except BaseException:
            self.stop()
            raise
        self.startup_s = time.monotonic() - t0
        return self

    def stop(self) -> None:
        """Cancel all jobs, stop the daemons, kill leftover job steps, remove the folder. Idempotent."""
        if self.dir is None:
            return
        try:
            atexit.unregister(self.stop)
            ctld = self._procs.get("slurmctld")
            if ctld is not None and ctld.poll() is None and self.conf_path is not None:
                self.run("scancel", "--quiet", "--user", self.user, check=False, timeout=10)
                deadline = time.monotonic() + 8
                while time.monotonic() < deadline:
                    r = self.run("squeue", "--noheader", "--format=%i", check=False, timeout=10)
                    if r.returncode != 0 or not r.stdout.strip():
                        break
                    time.sleep(0.2)
            for name in ("slurmd", "slurmctld", "munged"):
                proc = self._procs.get(name)
                if proc is None:
                    continue
                if proc.poll() is None:
                    proc.terminate()
                    try:
                        proc.wait(timeout=8)
                    except subprocess.TimeoutExpired:
                        proc.kill()
                        proc.wait(timeout=5)
            self._kill_strays()
        finally:
            self._procs.clear()
            for f in self._log_handles:
                f.close()
            self._log_handles.clear()
            if not self.keep:
                shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None

    def stray_processes(self) -> list[int]:
        """Processes (other than this one and its ancestors) that belong to this cluster: daemons, slurmstepd and
        job processes (found by SLURM_CONF=<our slurm.conf> in their environment or our folder on their command
        line). Empty after `stop()`."""
        if self.conf_path is None:
            return []
        marker_env = f"SLURM_CONF={self.conf_path}".encode()
        marker_dir = (str(self.conf_path.parent) + "/").encode()
        skip = _ancestors()
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) in skip:
                continue
            try:
                if (entry / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                    continue  # zombies hold nothing; their parent (or init) reaps them
                environ = (entry / "environ").read_bytes().split(b"\0")
                cmdline = (entry / "cmdline").read_bytes()
            except (OSError, IndexError):
                continue
            if marker_env in environ or marker_dir in cmdline:
                found.append(int(entry.name))
        return found

    def _kill_strays(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            pids = self.stray_processes()
            if not pids:
                return
            for pid in pids:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + 3
            while time.monotonic() < deadline and self.stray_processes():
                time.sleep(0.1)

    # ----------------------------------------------------------------------------------------------- start-up
    @staticmethod
    def _default_memory_mb() -> int:
        try:
            total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20
        except (ValueError, OSError):
            total = 2048
        return max(256, int(total * 0.8))  # slurmd drains a node that has less memory than configured

    def _spawn(self, name: str, argv: list[str]) -> subprocess.Popen:
        log = self.dir / "log" / f"{name}.out"
        fh = open(log, "ab")
        self._log_handles.append(fh)
        env = self._clean_env()
        if self.conf_path is not None:
            env["SLURM_CONF"] = str(self.conf_path)
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=self.dir,
            preexec_fn=_die_with_parent,
        )
        self._procs[name] = proc
        self._logs[name] = log
        return proc

    def _start_munge(self) -> None:
        mdir = self.dir / "munge"
        key = mdir / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        self.munge_socket = mdir / "munge.socket"
        self._spawn(
            "munged",
            [_which("munged"), "--foreground", "--force", f"--key-file={key}", f"--socket={self.munge_socket}",
             f"--log-file={mdir / 'munged.log'}", f"--pid-file={mdir / 'munged.pid'}",
             f"--seed-file={mdir / 'munged.seed'}", "--num-threads=2"],
        )
        deadline = time.monotonic() + 10
        while True:
            self._check_alive("munged")
            if self.munge_socket.exists():
                r = subprocess.run(
                    [_which("munge"), "-n", "-S", str(self.munge_socket)], capture_output=True, timeout=10
                )
                if r.returncode == 0:
                    return
            if time.monotonic() > deadline:
                raise SlurmClusterError(f"munged did not answer on {self.munge_socket}\n{self.logs('munged')}")
            time.sleep(0.05)

    def _write_conf(self) -> None:
        d = self.dir
        self.ctld_port, self.slurmd_port = _free_ports(2)
        (d / "plugstack.conf").write_text("")  # keep /etc/slurm/plugstack.conf's SPANK plugins out
        lines = [
            "# throwaway single-node cluster for tests (tests/slurm_cluster.py)",
            "ClusterName=testcluster",
            f"SlurmctldHost={self.host}(127.0.0.1)",
            f"SlurmUser={self.user}",
            f"SlurmdUser={self.user}",
            f"SlurmctldPort={self.ctld_port}",
            f"SlurmdPort={self.slurmd_port}",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={self.munge_socket},cred_expire={self.cred_expire_s}",
            f"StateSaveLocation={d / 'state'}",
            f"SlurmdSpoolDir={d / 'spool'}",
            f"SlurmctldPidFile={d / 'slurmctld.pid'}",
            f"SlurmdPidFile={d / 'slurmd.pid'}",
            f"SlurmctldLogFile={d / 'log' / 'slurmctld.log'}",
            f"SlurmdLogFile={d / 'log' / 'slurmd.log'}",
            f"PlugStackConfig={d / 'plugstack.conf'}",
            "SlurmctldDebug=info",
            "SlurmdDebug=info",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "SchedulerType=sched/backfill",
            "SchedulerParameters=sched_interval=1,bf_interval=1",
            "MpiDefault=none",
            "MailProg=/bin/true",
            "ReturnToService=2",
            "KillWait=2",
            "MinJobAge=600",
            "InactiveLimit=0",
            "SlurmdTimeout=60",
            *self.extra_conf,
            f"NodeName={self.node_name} NodeAddr=127.0.0.1 NodeHostname={self.host} CPUs={self.cpus} "
            f"RealMemory={self.real_memory_mb} State=UNKNOWN",
            f"PartitionName={self.partition} Nodes={self.node_name} Default=YES MaxTime=INFINITE State=UP",
        ]
        self.conf_path = d / "slurm.conf"
        self.conf_path.write_text("\n".join(lines) + "\n")

    def _check_alive(self, *names: str) -> None:
        for name in names or tuple(self._procs):
            proc = self._procs.get(name)
            if proc is not None and proc.poll() is not None:
                raise SlurmClusterError(f"{name} exited with status {proc.returncode}\n{self.logs(name)}")

    def _wait_node_ready(self, deadline: float) -> None:
        last = ""
        while True:
            self._check_alive()
            r = self.run("sinfo", "--noheader", "--format=%T", "--nodes", self.node_name, check=False, timeout=10)
            last = (r.stdout + r.stderr).strip()
            state = r.stdout.strip().lower().rstrip("*~#!%$@^-")
            if r.returncode == 0 and state in ("idle", "mixed", "allocated"):
                return
            if r.returncode == 0 and any(s in state for s in ("drain", "down", "inval", "fail")):
                reason = self.run("sinfo", "-R", "--noheader", check=False).stdout.strip()
                raise SlurmClusterError(f"node {self.node_name} is {state}: {reason}\n{self.logs()}")
            if time.monotonic() > deadline:
                raise SlurmClusterError(
                    f"node {self.node_name} not ready after {self.start_timeout_s:.0f} s (last sinfo: {last!r})\n"
                    f"{self.logs()}"
                )
            time.sleep(0.1)

    def logs(self, *names: str, tail: int = 30) -> str:
        """The last lines of the daemons' logs (for error messages)."""
        if self.dir is None:
            return ""
        files = {
            "munged": [self.dir / "munge" / "munged.log", self.dir / "log" / "munged.out"],
            "slurmctld": [self.dir / "log" / "slurmctld.log", self.dir / "log" / "slurmctld.out"],
            "slurmd": [self.dir / "log" / "slurmd.log", self.dir / "log" / "slurmd.out"],
        }
        out = []
        for name in names or tuple(files):
            for f in files.get(name, []):
                if f.exists():
                    lines = f.read_text(errors="replace").splitlines()[-tail:]
                    out.append(f"--- {f} ---\n" + "\n".join(lines))
        return "\n".join(out)

    # ----------------------------------------------------------------------------------------------- clients
    @property
    def env(self) -> dict[str, str]:
        """What a Slurm client (sbatch, squeue, submitit) needs to reach this cluster."""
        if self.conf_path is None:
            raise SlurmClusterError("cluster not started")
        return {"SLURM_CONF": str(self.conf_path)}

    @staticmethod
    def _clean_env(base: dict[str, str] | None = None) -> dict[str, str]:
        env = dict(os.environ if base is None else base)
        for k in list(env):
            if k.startswith(_CLIENT_ENV_PREFIXES):
                del env[k]
        return env

    def environ(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """`base` (default os.environ) without inherited SLURM_*/SBATCH_*/... variables, plus `env`."""
        env = self._clean_env(base)
        env.update(self.env)
        return env

    def run(self, cmd: str, *args: str, check: bool = True, timeout: float = 30,
            input: str | None = None) -> subprocess.CompletedProcess:
        """Run a Slurm client command against this cluster; `check` raises SlurmClusterError with its output."""
        exe = _which(cmd) or cmd
        r = subprocess.run([exe, *map(str, args)], env=self.environ(), capture_output=True, text=True,
                           timeout=timeout, input=input, cwd=self.dir)
        if check and r.returncode != 0:
            raise SlurmClusterError(
                f"{cmd} {' '.join(map(str, args))} failed ({r.returncode}): {r.stderr.strip() or r.stdout.strip()}"
            )
        return r

    def sbatch(self, *args: str, script: str | None = None) -> str:
        """Submit with `sbatch --parsable ARGS` (script text on stdin when `script` is given); returns the job id
        (the array's job id for `--array`)."""
        r = self.run("sbatch", "--parsable", *args, input=script)
        return r.stdout.strip().split(";")[0]

    def squeue(self, *job_ids: str, all_states: bool = False) -> list[tuple[str, str]]:
        """[(job id as squeue prints it, e.g. '7', '5_1' or '5_[2-3]', long state), ...]. Finished jobs only with
        all_states=True (kept for MinJobAge)."""
        args = ["--noheader", "--format=%i|%T"]
        if all_states:
            args.append("--states=all")
        if job_ids:
            args.append("--jobs=" + ",".join(job_ids))
        r = self.run("squeue", *args, check=False)
        if r.returncode != 0:
            if "Invalid job id" in r.stderr:
                return []
            raise SlurmClusterError(f"squeue failed: {r.stderr.strip()}")
        return [tuple(line.split("|", 1)) for line in r.stdout.splitlines() if line.strip()]

    def scancel(self, *args: str) -> None:
        self.run("scancel", *args)

    def requeue(self, job_id: str) -> None:
        """`scontrol requeue`: the job goes back to PENDING (Restarts+1) and runs again after cred_expire_s."""
        self.run("scontrol", "requeue", job_id)

    def show_job_text(self, job_id: str, details: bool = True) -> str:
        """Raw `scontrol show job [-dd] ID` output (multi-line records), e.g. to assert no secret appears in it."""
        args = ["-dd"] if details else []
        return self.run("scontrol", *args, "show", "job", job_id).stdout

    def show_job(self, job_id: str) -> list[dict[str, str]]:
        """`scontrol -o show job ID` parsed: one dict per job record (one per array task once it was scheduled;
        pending array tasks may share one record with ArrayTaskId like '2-3'). [] when unknown or purged."""
        r = self.run("scontrol", "-o", "show", "job", job_id, check=False)
        if r.returncode != 0:
            if "Invalid job id" in r.stderr:
                return []
            raise SlurmClusterError(f"scontrol show job {job_id} failed: {r.stderr.strip()}")
        return parse_scontrol_records(r.stdout)

    def job_states(self, job_id: str) -> dict[str, str]:
        """{'7': 'COMPLETED'} for a job, {'5_0': 'RUNNING', '5_1': 'CANCELLED', '5_2-3': 'PENDING'} for an array
        (array tasks as ARRAYID_TASKID; pending ones may be grouped), from `scontrol show job`."""
        states = {}
        for rec in self.show_job(job_id):
            if rec.get("ArrayJobId") and rec.get("ArrayTaskId"):
                key = f"{rec['ArrayJobId']}_{rec['ArrayTaskId']}"
            else:
                key = rec.get("JobId", "")
            states[key] = rec.get("JobState", "")
        return states

    def wait_for_state(self, job_id: str, states: Iterable[str], timeout: float = 30) -> str:
        """Wait until every record of `job_id` (e.g. '7' or '5_1') is in one of `states`; returns the state."""
        wanted = {s.upper() for s in states}
        deadline = time.monotonic() + timeout
        while True:
            got = self.job_states(job_id)
            if got and all(s in wanted for s in got.values()):
                return next(iter(got.values()))
            if time.monotonic() > deadline:
                raise SlurmClusterError(f"job {job_id} not in {sorted(wanted)} after {timeout} s: {got}\n"
                                        f"{self.logs('slurmctld', 'slurmd', tail=15)}")
            time.sleep(0.2)

    def wait_for_jobs(self, *job_ids: str, timeout: float = 60) -> dict[str, str]:
        """Wait until the jobs (all tasks of arrays) reach a terminal state; returns their `job_states`."""
        deadline = time.monotonic() + timeout
        while True:
            states: dict[str, str] = {}
            for j in job_ids:
                states.update(self.job_states(j))
            if states and all(s in TERMINAL_STATES for s in states.values()):
                return states
            if time.monotonic() > deadline:
                raise SlurmClusterError(f"jobs {job_ids} not finished after {timeout} s: {states}\n"
                                        f"{self.logs('slurmctld', 'slurmd', tail=15)}")
            time.sleep(0.2)
