"""Measure a shortened sweep and set it beside the wall-time model (`cushing sweep --plan`), for issue 7.

Writes a copy of the study file with `epochs` shortened and random weights (a GPU machine has no hub access, and
speed does not depend on the weights), runs `cushing sweep` on it with N workers in a fresh MLflow store and Optuna
storage, and reports: the measured wall time, the model's estimate for the same shortened grid, each child run's
training seconds and median epoch, and the model's estimate for the full-length grid scaled by measured/estimated
(the extrapolation). JSON under --out; exits 1 unless every configuration finished.

  python scripts/gpu_sweep_timing.py --out $OUT --epochs 20 --workers 2 --img-size 224   # GPU: the paper grid
  python scripts/gpu_sweep_timing.py --out /tmp/x --study projects/demo.yaml --epochs 1 --img-size 14  # CPU smoke
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml


def shortened(study: Path, epochs: int, dst: Path, compile: str | None, img_size: int | None = None) -> Path:
    data = yaml.safe_load(study.read_text())
    data["name"] = f"{data.get('name', study.stem)}-{epochs}ep"
    data.setdefault("base", {}).update(epochs=epochs, pretrained=False)
    if compile:
        data["base"]["compile"] = compile
    if img_size:
        data["base"]["img_size"] = img_size
    for conf in data.get("configurations", []):
        conf.pop("epochs", None)
        conf.pop("pretrained", None)
        if img_size:
            conf.pop("img_size", None)
    dst.write_text(yaml.safe_dump(data, sort_keys=False))
    return dst


def children(experiment: str) -> list[dict]:
    import mlflow

    c = mlflow.MlflowClient()
    exp = c.get_experiment_by_name(experiment)
    runs = c.search_runs([exp.experiment_id], max_results=1000) if exp else []
    out = []
    for r in runs:
        if not r.data.tags.get("sweep_config") or r.info.status != "FINISHED":
            continue
        m = r.data.metrics
        out.append({"configuration": r.data.tags["sweep_config"], "train_s": m.get("train_seconds"),
                    "epoch_median_s": m.get("epoch_seconds_median"), "first_epoch_s": m.get("first_epoch_seconds"),
                    "run_s": (r.info.end_time - r.info.start_time) / 1000})
    return sorted(out, key=lambda d: d["configuration"])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from cushing.config import COMPILE_MODES

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--study", default="projects/paper.yaml")
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--full-epochs", type=int, default=200)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--compile", default=None, choices=COMPILE_MODES)
    ap.add_argument("--img-size", type=int, default=None, help="every configuration at this size (default: the "
                    "study's own sizes)")
    return ap.parse_args(argv)


def main() -> None:
    a = parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="sweep-timing-"))
    os.environ.setdefault("CUSHING_HOME", str(work / "home"))
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{work / 'mlflow.db'}"
    os.environ["CUSHING_OPTUNA_STORAGE"] = f"sqlite:///{work / 'optuna.db'}"
    short = shortened(Path(a.study), a.epochs, work / "short.yaml", a.compile, a.img_size)
    full = shortened(Path(a.study), a.full_epochs, work / "full.yaml", a.compile, a.img_size)

    from cushing.workflows.sweeps import load_for, plan_sweep

    study = load_for(short, "sweep")
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "cushing", "sweep", str(short), "--workers", str(a.workers)],
                          capture_output=True, text=True, cwd=work)  # its artifacts (./mlruns) not in the clone
    wall = time.perf_counter() - t
    _, est_short = plan_sweep(short, [a.workers])
    _, est_full = plan_sweep(full, [1, 2, 4, a.workers])
    kids = children(study.experiment)
    scale = wall / est_short[a.workers]
    result = {
        "study": a.study, "epochs": a.epochs, "img_size": a.img_size, "workers": a.workers, "compile": a.compile,
        "exit_code": proc.returncode,
        "measured_wall_s": wall, "estimated_wall_s": est_short[a.workers], "measured_over_estimated": scale,
        "full_estimate_s": est_full, "full_extrapolated_s": {w: s * scale for w, s in est_full.items()},
        "children_finished": len(kids), "children": kids, "stderr_tail": proc.stderr[-3000:],
    }
    (out / f"sweep_timing_{a.epochs}ep_w{a.workers}{'_' + a.compile if a.compile else ''}.json").write_text(
        json.dumps(result, indent=1, default=str))
    print(f"{a.study}: {a.epochs} epochs, --workers {a.workers}: measured {wall:.0f} s, model {est_short[a.workers]:.0f} s"
          f" (x{scale:.2f}); {len(kids)} runs finished; exit {proc.returncode}")
    for w, s in est_full.items():
        print(f"  {a.full_epochs} epochs, --workers {w}: model {s / 60:.1f} min, scaled by the measurement "
              f"{s * scale / 60:.1f} min")
    if proc.returncode or len(kids) < len(study.configurations):
        sys.exit(f"the sweep failed: {len(kids)} of {len(study.configurations)} runs finished, exit code "
                 f"{proc.returncode}\n{proc.stderr[-3000:]}")


if __name__ == "__main__":
    main()
