"""What would make a multi-node launch fail or leak, found before anything is submitted: no Slurm client, a store
the compute nodes do not share or cannot reach (this host's loopback), secrets other accounts or Slurm could read."""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import subprocess
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence
from urllib.parse import urlparse

from cushing.tracking import tracking_uri
from cushing.workflows.cluster.options import ClusterError, SlurmOptions
from cushing.workflows.cluster.secrets import SECRET_VARIABLES, SECRETS_FILE_ENV, STORAGE_ENV, _mode_problem, \
    read_secrets_file

__all__ = ["Preflight", "launch_checks", "preflight"]


_LOOPBACK = {"localhost", "127.0.0.1", "::1", "0.0.0.0", "ip6-localhost"}


@dataclass(frozen=True)
class Preflight:
    problems: tuple[str, ...] = ()  # any one refuses the launch
    warnings: tuple[str, ...] = ()


def _scheme(url: str) -> str:
    return url.split(":", 1)[0].lower() if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*:", url) else ""


def _is_loopback(url: str) -> bool:
    """The URL names this host: a loopback address, or a database's local socket (no host, or ?host=/folder)."""
    try:
        u = urlparse(url)
    except ValueError:
        return False
    host = u.hostname or ""
    if not host and (m := re.search(r"host=([^&]+)", u.query or "")):
        host = "" if m.group(1).startswith("/") else m.group(1)
    if host == "":  # postgresql:///db: a Unix socket on whichever host runs the client
        return _scheme(url).startswith("postgres")
    return host.lower() in _LOOPBACK or host.startswith("127.")


def launch_checks(*, tracking_uri: str, storage: str, sbatch: str | None, srun: str | None,
                  compute_hosts: Sequence[tuple[str, ...]] | None, local_names: set[str],
                  private_files: Mapping[str, str] | None = None,
                  secrets_in_env: Sequence[str] = ()) -> Preflight:
    """compute_hosts: per node of the partition, its name, hostname and address (None: could not be listed)."""
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
    problems += [p for p in (_mode_problem(var, path) for var, path in (private_files or {}).items()) if p]
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
