"""`cushing bench run`: whole runs on the demo cohort, in process (as a sweep worker runs each configuration) and
launched (`mlflow run`, as a user's first run), split by the phases each run's own timer recorded."""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from cushing import tracking
from cushing.config import TrainConfig
from cushing.devices import device_name, pick_device
from cushing.model.train import prepare_cohort
from cushing.phases import OTHER, PHASES_OUT_ENV
from cushing.tracking.stores import seed_sqlite
from cushing.workflows.experiment import run_single

__all__ = ["bench_run", "launch_run", "LAUNCHER", "STARTUP", "EXIT"]

LAUNCHER = "launcher (mlflow run: its imports, project, store, run; until the training process starts)"
STARTUP = "python start, imports, arguments"
EXIT = "exit (summary, interpreter teardown, launcher end)"


def bench_run(*, model: str = "resnet18", img_size: int = 112, epochs: int = 3, repeats: int = 3,
              device: str = "auto", cam: bool = True, out: str = "bench_run.json", launches: int = 1) -> list[dict]:
    """Whole runs on the demo cohort (random weights), split by the phases the run's own timer recorded.

    In process (`run_single`, as a sweep worker runs them; median of `repeats`, after one warm-up run on CUDA for
    its lazy start and cuDNN's autotuning; a CPU has neither, and the median leaves out the first run's imports):
    the per-run cost a sweep pays for each configuration. Launched (`launches` times `mlflow run . --env-manager
    local`, each on a fresh store, as a user's first run in a fresh clone): also the launcher, the process start
    and the exit.
    Logs into throwaway stores, not yours. Prints one table and writes it as JSON."""
    cfg = TrainConfig(model=model, pretrained=False, img_size=img_size, epochs=epochs, device=device, cam=cam,
                      experiment="cushing-bench")
    dev = pick_device(device)
    with tempfile.TemporaryDirectory(prefix="cushing-bench-run-") as d, \
            tracking.using_store(f"sqlite:///{d}/mlflow.db"):
        cohort = prepare_cohort(cfg, progress=False)
        if dev.type == "cuda":
            run_single(cfg, cohort=cohort, progress=False)  # warm-up
        rows = []
        for _ in range(repeats):
            t = time.perf_counter()
            summary = run_single(cfg, cohort=cohort, progress=False)
            wall = time.perf_counter() - t
            train_s = summary.metrics["train_seconds"]
            rows.append({"wall_s": wall, "train_s": train_s, "other_s": wall - train_s,
                         "phases": summary.phases.table()})
    launched = [launch_run(model=model, img_size=img_size, epochs=epochs, device=device, cam=cam)
                for _ in range(launches)]
    med = {k: statistics.median(r[k] for r in rows) for k in ("wall_s", "train_s", "other_s")}
    table = {"in_process": _median_phases([r["phases"] for r in rows]),
             "mlflow_run": _median_phases([r["phases"] for r in launched]) if launched else {}}
    name = device_name(dev)
    print(f"device: {name}; {model} at {img_size} px, {epochs} epochs, Grad-CAM {'on' if cam else 'off'}; "
          f"median of {repeats} in-process runs" + (f" and of {launches} launched (mlflow run)" if launches else ""))
    _print_phases(table)
    print(f"run {med['wall_s']:.2f} s = training loop {med['train_s']:.2f} s + the rest {med['other_s']:.2f} s "
          f"(rest/loop {med['other_s'] / med['train_s']:.2f}; in process, as a sweep runs each configuration)")
    lmed = {}
    if launched:
        lmed = {k: statistics.median(r[k] for r in launched) for k in ("wall_s", "train_s")}
        print(f"mlflow run {lmed['wall_s']:.2f} s = {lmed['wall_s'] / lmed['train_s']:.2f} x the training loop "
              f"({lmed['train_s']:.2f} s): launcher to exit, on a fresh store")
    Path(out).write_text(json.dumps({"device": name, "model": model, "img_size": img_size, "epochs": epochs, "cam": cam,
                                     "median": med, "runs": rows, "phases": table,
                                     "mlflow_run": {"median": lmed, "runs": launched}}, indent=1))
    return rows


def launch_run(*, model: str, img_size: int, epochs: int, device: str = "auto", cam: bool = True) -> dict:
    """One `mlflow run . --env-manager local` of the main entry point on a fresh throwaway store (seeded as
    scripts/quickstart.sh seeds one), split into the launcher, the training process's start, the phases the run
    recorded itself (CUSHING_PHASES_OUT) and the exit."""
    root = Path(__file__).resolve().parents[2]
    if not (root / "MLproject").exists():
        raise FileNotFoundError(f"no MLproject beside the package ({root}): launched runs need the project's clone")
    with tempfile.TemporaryDirectory(prefix="cushing-bench-launch-") as d:
        report, store = Path(d) / "phases.json", f"sqlite:///{d}/mlflow.db"
        seed_sqlite(store)  # as scripts/quickstart.sh does before its `mlflow run`
        env = {**os.environ, "MLFLOW_TRACKING_URI": store, PHASES_OUT_ENV: str(report)}
        for k in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME"):
            env.pop(k, None)
        params = {"model": model, "pretrained": "false", "epochs": epochs, "img_size": img_size, "device": device,
                  "cam": str(cam).lower(), "experiment": "cushing-bench"}
        mlflow = Path(sys.executable).with_name("mlflow")  # the `mlflow` a user types, from this environment
        cmd = [*([str(mlflow)] if mlflow.exists() else [sys.executable, "-m", "mlflow"]), "run", str(root),
               "--env-manager", "local", "--experiment-name", "cushing-bench",
               *[a for k, v in params.items() for a in ("-P", f"{k}={v}")]]
        t0 = time.time()
        r = subprocess.run(cmd, cwd=d, env=env, capture_output=True, text=True)
        t1 = time.time()
        if r.returncode != 0 or not report.exists():
            raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stderr[-3000:]}")
        run = json.loads(report.read_text())
    started = run["process_start"] or run["start"]
    phases = {LAUNCHER: started - t0, STARTUP: run["start"] - started, **run["phases"], EXIT: t1 - run["end"]}
    return {"wall_s": t1 - t0, "train_s": run["train_seconds"], "phases": phases}


def _median_phases(tables: list[dict[str, float]]) -> dict[str, float]:
    names = list(dict.fromkeys(n for t in tables for n in t))
    order = [n for n in names if n != OTHER] + [OTHER] * (OTHER in names)
    return {n: statistics.median(t.get(n, 0.0) for t in tables) for n in order}


def _print_phases(table: dict[str, dict[str, float]]) -> None:
    cols = [c for c in ("mlflow_run", "in_process") if table.get(c)]
    order = list(dict.fromkeys(n for c in cols for n in table[c] if n != OTHER)) + [OTHER]
    totals = {c: sum(table[c].values()) for c in cols}
    heads = {"mlflow_run": "mlflow run", "in_process": "in process"}
    print(f"{'phase':76s}" + "".join(f"{heads[c]:>20s}" for c in cols))
    for n in order + ["total"]:
        cells = []
        for c in cols:
            v = totals[c] if n == "total" else table[c].get(n)
            cells.append(f"{'-':>20s}" if v is None else f"{v:9.2f} s {100 * v / totals[c]:6.1f}%  ")
        print(f"{n[:76]:76s}" + "".join(cells))
