"""The `cushing` console script. Each subcommand parses, calls one core function, returns an exit code."""
from __future__ import annotations

import argparse
import dataclasses
import sys
import typing
from pathlib import Path
from typing import Callable, Sequence

from .config import ConfigError, TrainConfig, resolve

__all__ = ["main", "build_parser"]

COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {}


def add_config_options(p: argparse.ArgumentParser, cls: type = TrainConfig) -> None:
    """One --option per config field, all parsed as strings and coerced by the typed config."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else None
        tp = hints[f.name]
        kind = getattr(tp, "__name__", str(tp)).replace("typing.", "")
        p.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, default=None, metavar=kind.upper()[:5],
                       help=f"default: {'auto' if default is None and f.name == 'freeze' else default}")


def config_from(ns: argparse.Namespace, cls: type = TrainConfig, base=None):
    overrides = {f.name: getattr(ns, f.name) for f in dataclasses.fields(cls) if getattr(ns, f.name, None) is not None}
    return resolve(cls, overrides, base=base)


# ------------------------------------------------------------------------------------------------ train

def _train_args(p: argparse.ArgumentParser) -> None:
    add_config_options(p)


def _train(ns: argparse.Namespace) -> int:
    from .experiment import run_experiment
    from .tracking import tracking_uri

    cfg = config_from(ns)
    summary = run_experiment(cfg, progress=True)
    m = summary.metrics
    print(f"run {summary.run_id} ({summary.run_name}) in {tracking_uri()}")
    for key in ("val/f1", "val/auc", "test/f1", "test/auc", "test/recall", "test/specificity"):
        if key in m:
            lo, hi = m.get(f"{key}/ci_low"), m.get(f"{key}/ci_high")
            ci = f"  [{lo:.3f}, {hi:.3f}]" if lo is not None and hi is not None else ""
            print(f"  {key:18s} {m[key]:.3f}{ci}")
    if summary.model_uri:
        print(f"model: {summary.model_uri}")
    return 0


COMMANDS["train"] = ("train one configuration (the MLproject main entry point)", _train_args, _train)


# ------------------------------------------------------------------------------------------------ demo-data

def _demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("out", help="folder to write images/ and manifest.csv into")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=224)


def _demo(ns: argparse.Namespace) -> int:
    from .demo import make_demo_cohort

    out = Path(ns.out)
    if (out / "manifest.csv").exists():
        print(f"{out / 'manifest.csv'} exists; not overwriting", file=sys.stderr)
        return 1
    path = make_demo_cohort(out, seed=ns.seed, size=ns.size)
    print(f"wrote synthetic demo cohort (343 subjects, Table I counts): {path}")
    return 0


COMMANDS["demo-data"] = ("write the synthetic demo cohort (Table I counts)", _demo_args, _demo)


# ------------------------------------------------------------------------------------------------ models

def _models_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-params", action="store_true", help="skip the parameter count (faster)")


def _models(ns: argparse.Namespace) -> int:
    from .backbones import REGISTRY, param_count

    print(f"{'name':11s} {'timm id':48s} {'params':>8s}  {'type':7s} default")
    for name, spec in REGISTRY.items():
        params = "" if ns.no_params else f"{param_count(name) / 1e6:7.1f}M"
        print(f"{name:11s} {spec.timm_id:48s} {params:>8s}  {spec.kind:7s} {'frozen' if spec.default_freeze else 'fine-tuned'}")
    return 0


COMMANDS["models"] = ("list the 20 backbones: name, timm id, parameters, default freeze", _models_args, _models)


# ------------------------------------------------------------------------------------------------ bench

def _bench_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("what", nargs="?", default="train", choices=["train", "faces"],
                   help="train: engine epoch vs compute floor; faces: face-stage photos/s cold and warm")
    p.add_argument("--models", default="resnet50,vit_b_16,swin_b,dinov2_b")
    p.add_argument("--frozen", default="dinov2_b", help="comma list also benchmarked with a frozen backbone")
    p.add_argument("--epochs", type=int, default=6, help="timed epochs after warm-up")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default="bench.json")
    p.add_argument("--manifest", default=None, help="faces: photos to time (default: a synthetic set)")
    p.add_argument("--limit", type=int, default=0, help="faces: at most this many photos")
    p.add_argument("--sam-checkpoint", default=None)


def _bench(ns: argparse.Namespace) -> int:
    if ns.what == "faces":
        from .faces_bench import bench_faces

        bench_faces(manifest=ns.manifest, limit=ns.limit, sam_checkpoint=ns.sam_checkpoint, out=ns.out)
        return 0
    from .bench import run_bench

    run_bench(models=[m for m in ns.models.split(",") if m], frozen=[m for m in ns.frozen.split(",") if m],
              epochs=ns.epochs, img_size=ns.img_size, device=ns.device, out=ns.out)
    return 0


COMMANDS["bench"] = ("time the engine's epoch against the compute floor (or the face stage)", _bench_args, _bench)


# ------------------------------------------------------------------------------------------------ main

def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="cushing", description=__doc__)
    parser.add_argument("--version", action="version", version=f"cushing {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (help_, configure, fn) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        configure(p)
        p.set_defaults(func=fn)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from .manifest import ManifestError
    from .splits import SplitError

    parser = build_parser()
    ns = parser.parse_args(argv)
    try:
        return int(ns.func(ns) or 0)
    except (ConfigError, ManifestError, SplitError) as e:
        print(f"cushing {ns.command}: {e}", file=sys.stderr)
        return 2
    except _user_errors() as e:
        print(f"cushing {ns.command}: {e}", file=sys.stderr)
        return 2


def _user_errors() -> tuple[type[BaseException], ...]:
    from .backbones import WeightsUnavailable

    return (WeightsUnavailable, FileNotFoundError)


if __name__ == "__main__":
    sys.exit(main())
