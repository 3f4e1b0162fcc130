"""`cushing train` (the MLproject main entry point), `cushing demo-data` and `cushing models`."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cushing.cli.options import Command, add_config_options, config_from

COMMANDS: dict[str, Command] = {}


def _train(ns: argparse.Namespace) -> int:
    from cushing.workflows.experiment import run_experiment
    from cushing.tracking import tracking_uri

    summary = run_experiment(config_from(ns), progress=True)
    m = summary.metrics
    print(f"run {summary.run_id} ({summary.run_name}) in {tracking_uri()}")
    if summary.selection:
        print(f"  {summary.selection}")
    for key in ("val/f1", "val/auc", "test/f1", "test/auc", "test/recall", "test/specificity"):
        if key in m:
            lo, hi = m.get(f"{key}/ci_low"), m.get(f"{key}/ci_high")
            ci = f"  [{lo:.3f}, {hi:.3f}]" if lo is not None and hi is not None else ""
            print(f"  {key:18s} {m[key]:.3f}{ci}")
    if summary.model_uri:
        print(f"model: {summary.model_uri}")
    return 0


COMMANDS["train"] = ("train one configuration (the MLproject main entry point)", add_config_options, _train)


def _demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("out", help="folder to write images/ and manifest.csv into")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=224)


def _demo(ns: argparse.Namespace) -> int:
    from cushing.data.demo import make_demo_cohort

    out = Path(ns.out)
    if (out / "manifest.csv").exists():
        print(f"{out / 'manifest.csv'} exists; not overwriting", file=sys.stderr)
        return 1
    path = make_demo_cohort(out, seed=ns.seed, size=ns.size)
    print(f"wrote synthetic demo cohort (343 subjects, Table I counts): {path}")
    return 0


COMMANDS["demo-data"] = ("write the synthetic demo cohort (Table I counts)", _demo_args, _demo)


def _models_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-params", action="store_true", help="skip the parameter count (faster)")


def _models(ns: argparse.Namespace) -> int:
    from cushing.model.backbones import REGISTRY, param_count

    print(f"{'name':11s} {'timm id':48s} {'params':>8s}  {'type':7s} default")
    for name, spec in REGISTRY.items():
        params = "" if ns.no_params else f"{param_count(name) / 1e6:7.1f}M"
        freeze = "frozen" if spec.default_freeze else "fine-tuned"
        print(f"{name:11s} {spec.timm_id:48s} {params:>8s}  {spec.kind:7s} {freeze}")
    return 0


COMMANDS["models"] = ("list the 20 backbones: name, timm id, parameters, default freeze", _models_args, _models)
