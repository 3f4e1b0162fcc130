"""What the job array asks Slurm for (`SlurmOptions`, Slurm's time formats, extra sbatch options) as submitit's
executor parameters (#SBATCH lines: no secret goes there); the errors a launch is refused with."""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

__all__ = ["ClusterError", "SubmititMissing", "DEFAULT_TIME_MIN", "SlurmOptions", "parse_time",
           "parse_sbatch_options", "sbatch_parameters"]


DEFAULT_TIME_MIN = 24 * 60  # per task; above 10 min so that submitit requeues a preempted task
# sbatch options the launcher sets itself (array, logs, preemption signal) or that would put the environment on the
# command line (`export=VAR=value`): refused in --slurm-option
MANAGED_OPTIONS = frozenset({"array", "output", "error", "open-mode", "signal", "job-name", "wckey", "export",
                             "export-file", "wrap", "parsable", "requeue", "no-requeue", "time", "partition",
                             "account", "mem", "gpus-per-task", "cpus-per-task"})


class ClusterError(RuntimeError):
    """A launch refused (with every reason at once) or a job array that cannot finish the grid."""


class SubmititMissing(ImportError, ClusterError):
    pass


def parse_time(text: str | int | None) -> int | None:
    """Slurm's time formats (minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS) as whole minutes; None for ''."""
    s = "" if text is None else str(text).strip()
    if s in ("", "None"):
        return None
    m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", s)
    if not m:
        raise ClusterError(f"time limit: minutes or [D-]HH:MM[:SS] as sbatch takes it, got {s!r}")
    days, *parts = m.groups()
    parts = [int(p) for p in parts if p is not None]
    units = (3600, 60, 1) if days is not None or len(parts) == 3 else (60, 1)  # D-HH[:MM[:SS]], HH:MM:SS; MM[:SS]
    seconds = int(days or 0) * 86400 + sum(p * u for p, u in zip(parts, units))
    if seconds <= 0:
        raise ClusterError(f"time limit must be positive, got {s!r}")
    return math.ceil(seconds / 60)


def parse_sbatch_options(items: Sequence[str]) -> dict[str, Any]:
    """`key=value` (or a bare `key` flag) per item, as sbatch's long options without the dashes."""
    out: dict[str, Any] = {}
    problems: list[str] = []
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
        return self.array or max(1, min(work, self.max_parallel or work))

    def at_once(self, tasks: int) -> int:
        return min(tasks, self.max_parallel or tasks)


def sbatch_parameters(options: SlurmOptions, name: str, tasks: int) -> dict[str, Any]:
    """submitit's SlurmExecutor parameters (they become #SBATCH lines: no secret may go here)."""
    extra = parse_sbatch_options(options.extra)
    extra["requeue" if options.requeue else "no-requeue"] = True
    params: dict[str, Any] = {"job_name": name, "time": options.time_min, "array_parallelism": options.at_once(tasks),
                              "stderr_to_stdout": True, "additional_parameters": extra}
    params.update({k: getattr(options, k) for k in ("partition", "account", "cpus_per_task", "gpus_per_task")
                   if getattr(options, k) is not None})
    if (gb := options.mem_gb) is not None:
        params["mem"] = f"{int(gb)}G" if gb == int(gb) else f"{math.ceil(gb * 1024)}M"
    return params
