"""Study files: `cushing sweep` (a grid, resumable, multi-worker; its plan and its tables) and `cushing tune`,
on this host's processes or a Slurm job array."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cushing.cli.options import Command, _compile_option, _opt_count, _opt_float, _workers, _yes

COMMANDS: dict[str, Command] = {}


def _sweep_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("project", help="a sweep study file, e.g. projects/paper.yaml")
    p.add_argument("--storage", default=None, help="Optuna storage URL shared by workers (default: SQLite next to "
                                                   "the MLflow store; postgresql://... for several hosts)")
    p.add_argument("--workers", type=_workers, default=None, metavar="N|auto",
                   help="trainings at once on this host, as processes (default auto: 2 with a CUDA GPU, else 1)")
    p.add_argument("--report", action="store_true", help="only print Table II and III from the tracking store")
    p.add_argument("--plan", action="store_true",
                   help="only print the estimated wall time on one H200 for 1, 2 and 4 workers (trains nothing)")
    p.add_argument("--plan-from", metavar="FILE", default=None,
                   help="--plan: the per-run seconds outside training measured by `cushing bench run --out FILE` "
                        "(default: ./bench_run.json when there is one, else the built-in H200 figure)")
    _compile_option(p)
    p.add_argument("--parent-run", default=None, help=argparse.SUPPRESS)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    _launcher_options(p, "one per configuration still to train")


def _launcher_options(p: argparse.ArgumentParser, tasks: str) -> None:
    """Where the workers run: here (processes) or a Slurm job array. Empty values (MLproject's unset) are defaults."""
    p.add_argument("--launcher", type=lambda s: s or "local", choices=("local", "slurm"), default="local",
                   help="local: processes on this host (default); slurm: a job array through submitit, one worker "
                        "per task (needs a tracking server and a PostgreSQL Optuna storage the nodes reach)")
    p.add_argument("--array", type=_opt_count, default=None, metavar="N", help=f"array tasks (default: {tasks}, "
                                                                                "capped by --max-parallel)")
    p.add_argument("--max-parallel", type=_opt_count, default=None, metavar="N",
                   help="at most N tasks at once (and the default array size's cap)")
    p.add_argument("--wait", type=_yes, nargs="?", const=True, default=False, metavar="true|false",
                   help="follow the array until it is done, then log the results on the parent run")
    p.add_argument("--slurm-partition", default=None, help="sbatch --partition")
    p.add_argument("--slurm-account", default=None, help="sbatch --account")
    p.add_argument("--slurm-time", type=_slurm_time, default=None, metavar="TIME",
                   help="time limit per task: minutes or [D-]HH:MM[:SS] (default 24:00:00; above 10 minutes a "
                        "preempted task is requeued)")
    p.add_argument("--slurm-gpus", type=_opt_count, default=None, metavar="N", help="GPUs per task")
    p.add_argument("--slurm-cpus", type=_opt_count, default=None, metavar="N", help="CPUs per task")
    p.add_argument("--slurm-mem-gb", type=_opt_float, default=None, metavar="GB", help="memory per task")
    p.add_argument("--slurm-option", action="append", default=[], metavar="KEY=VALUE",
                   help="any other sbatch option, e.g. qos=high or constraint=a100 (repeatable; several in one "
                        "value separated by spaces)")
    p.add_argument("--slurm-logs", default=None, metavar="DIR",
                   help="submission scripts and task logs, on storage the nodes share (default ./slurm-logs)")
    p.add_argument("--no-requeue", action="store_true", help="do not requeue preempted tasks (default: requeue)")


def _slurm_time(text: str) -> int | None:
    from cushing.workflows.cluster import ClusterError, parse_time

    try:
        return parse_time(text)
    except ClusterError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _slurm_options(ns: argparse.Namespace):
    """The job array's SlurmOptions from the command line (ClusterError when they do not make sense)."""
    from cushing.workflows.cluster import DEFAULT_TIME_MIN, SlurmOptions

    extra = tuple(item for value in ns.slurm_option for item in value.split() if item not in ("''", '""'))
    return SlurmOptions(partition=ns.slurm_partition or None, account=ns.slurm_account or None,
                        time_min=ns.slurm_time or DEFAULT_TIME_MIN, gpus_per_task=ns.slurm_gpus,
                        cpus_per_task=ns.slurm_cpus, mem_gb=ns.slurm_mem_gb, array=ns.array,
                        max_parallel=ns.max_parallel, extra=extra, requeue=not ns.no_requeue,
                        **({"folder": Path(ns.slurm_logs)} if ns.slurm_logs else {}))


def _on_slurm(ns: argparse.Namespace, command: str) -> int:
    """The study as a Slurm job array; with --wait, the results as a local launch prints them."""
    from cushing.workflows.cluster import ClusterError, submit_sweep, submit_tune

    submit, more = (submit_sweep, {}) if command == "sweep" else (submit_tune, {"n_trials": ns.n_trials or None})
    try:
        sub = submit(ns.project, _slurm_options(ns), storage=ns.storage or None, compile=ns.compile, wait=ns.wait,
                     **more)
    except ClusterError as e:
        print(f"cushing {command}: {e}", file=sys.stderr)
        return 2
    if sub.sweep is not None:
        _print_sweep_result(sub.sweep)
    if sub.tune is not None:
        _print_tune_result(sub.tune)
    return 0


def _print_sweep_result(res) -> None:
    print(f"sweep {res.study_name}: parent run {res.parent_run_id}, {res.seconds:.0f} s"
          + (f", trained {res.trained} here" if res.trained >= 0 else ""))
    for r in res.retried:
        print(f"  retried: trial {r['retry_of']} ({r['config']}) as trial {r['trial']} -> {r['state']}")
    _print_tables(res.table2, res.table3)


def _print_plan(project: str, workers: int | None, compile: str | None, plan_from: str | None = None) -> int:
    from cushing.workflows.plan import default_overhead, overhead_from_bench
    from cushing.workflows.sweeps import plan_sweep

    counts = sorted({1, 2, 4, workers or 1})
    if plan_from is None and Path("bench_run.json").exists():
        plan_from = "bench_run.json"  # what `cushing bench run` wrote here last
    try:
        overhead = overhead_from_bench(plan_from) if plan_from else default_overhead()
    except ValueError as e:
        print(f"cushing sweep --plan: {e}", file=sys.stderr)
        return 2
    table, wall = plan_sweep(project, counts, compile, overhead)
    print(table.to_string(index=False, float_format=lambda v: f"{v:.0f}"))
    print(f"\nper run outside the training loop: {overhead.worker_s:.1f} s; {overhead.source}")
    how = "cold compile cache" if compile and compile != "none" else "as the file says"
    print(f"\nestimated wall time on one NVIDIA H200 (registry epoch costs, compile: {how}; other GPUs scale; "
          "measure with the sweep itself):")
    for w, sec in wall.items():
        print(f"  --workers {w}: {sec / 60:5.1f} min")
    return 0


def _print_tables(t2, t3) -> None:
    if t2.empty:
        print("no finished configurations yet")
        return
    cols2 = [c for c in t2.columns if not c.endswith(("ci_low", "ci_high")) and c != "run_id"]
    print("Table II (ranked on validation; test metrics alongside)")
    print(t2[cols2].to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    print("\nTable III (per sex, test)")
    print(t3.to_string(index=False, float_format=lambda v: f"{v:.3f}"))


def _sweep(ns: argparse.Namespace) -> int:
    from cushing.workflows.sweeps import default_storage, load_for, report_sweep, run_sweep

    if ns.plan:
        return _print_plan(ns.project, ns.workers, ns.compile, ns.plan_from)
    if ns.worker:
        from cushing.workflows.sweeps.worker import sweep_worker

        sweep_worker(load_for(ns.project, "sweep", ns.compile), ns.storage or default_storage(), ns.parent_run,
                     progress=False)
        return 0
    if ns.report:
        parent, t2, t3 = report_sweep(ns.project, ns.storage or None)
        if parent is None:
            print(f"no sweep of {ns.project} in this storage yet", file=sys.stderr)
            return 1
        print(f"sweep parent run {parent}")
        _print_tables(t2, t3)
        return 0
    if ns.launcher == "slurm":
        if ns.workers and ns.workers > 1:
            print("cushing sweep: --workers counts processes on this host; with --launcher slurm each array task is "
                  "one worker: use --array N", file=sys.stderr)
            return 2
        return _on_slurm(ns, "sweep")
    res = run_sweep(ns.project, storage=ns.storage or None, workers=ns.workers, parent_run_id=ns.parent_run or None,
                    compile=ns.compile)
    _print_sweep_result(res)
    return 0


COMMANDS["sweep"] = ("run a study file's grid (e.g. the paper's 23 configurations), resumable, multi-worker",
                     _sweep_args, _sweep)


def _tune_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("project", help="a tune study file, e.g. projects/tune_vit.yaml")
    p.add_argument("--storage", default=None, help="Optuna storage URL (shared by workers and hosts)")
    p.add_argument("--n-trials", type=int, default=None, help="trials for this worker (default: the file's; with "
                                                               "--launcher slurm, shared by the array's tasks)")
    _compile_option(p)
    _launcher_options(p, "one per trial")


def _print_tune_result(res) -> None:
    print(f"tune {res.study_name}: parent run {res.parent_run_id}; {res.n_complete} complete, {res.n_pruned} pruned")
    print(f"best value {res.best_value:.4f} with {res.best_params}")
    if not res.importances.empty:
        print(res.importances.to_string(index=False))


def _tune(ns: argparse.Namespace) -> int:
    from cushing.workflows.sweeps import run_tune

    if ns.launcher == "slurm":
        return _on_slurm(ns, "tune")
    res = run_tune(ns.project, storage=ns.storage or None, n_trials=ns.n_trials or None, compile=ns.compile)
    _print_tune_result(res)
    return 0


COMMANDS["tune"] = ("Optuna TPE search with pruning; trials as nested MLflow runs", _tune_args, _tune)
