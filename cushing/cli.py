"""The `cushing` console script. Each subcommand parses, calls one core function, returns an exit code."""
from __future__ import annotations

import argparse
import dataclasses
import signal
import sys
import threading
import typing
from pathlib import Path
from typing import Callable, Sequence

from cushing.config import COMPILE_MODES, ConfigError, TrainConfig, resolve

__all__ = ["main", "build_parser"]

COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {}


def _opt_float(text: str) -> float | None:
    """A float option that MLproject may pass as '' (unset)."""
    return None if text in ("", "none", "None") else float(text)


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
    from cushing.workflows.experiment import run_experiment
    from cushing.tracking import tracking_uri

    cfg = config_from(ns)
    summary = run_experiment(cfg, progress=True)
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


COMMANDS["train"] = ("train one configuration (the MLproject main entry point)", _train_args, _train)


# ------------------------------------------------------------------------------------------------ demo-data

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


# ------------------------------------------------------------------------------------------------ models

def _models_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-params", action="store_true", help="skip the parameter count (faster)")


def _models(ns: argparse.Namespace) -> int:
    from cushing.model.backbones import REGISTRY, param_count

    print(f"{'name':11s} {'timm id':48s} {'params':>8s}  {'type':7s} default")
    for name, spec in REGISTRY.items():
        params = "" if ns.no_params else f"{param_count(name) / 1e6:7.1f}M"
        print(f"{name:11s} {spec.timm_id:48s} {params:>8s}  {spec.kind:7s} {'frozen' if spec.default_freeze else 'fine-tuned'}")
    return 0


COMMANDS["models"] = ("list the 20 backbones: name, timm id, parameters, default freeze", _models_args, _models)


# ------------------------------------------------------------------------------------------------ bench

def _bench_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("what", nargs="?", default="train", choices=["train", "run", "faces", "serve"],
                   help="train: engine epoch vs compute floor; run: whole runs split into training and the rest "
                        "(--models: the first one); faces: face-stage photos/s cold and warm; serve: latency and "
                        "requests/s of served models (--model-uri, --url) at 1, 4 and 8 concurrent clients")
    p.add_argument("--model-uri", action="append", default=[], help="serve: a model to serve and time (repeatable)")
    p.add_argument("--url", action="append", default=[], help="serve: an already running scoring server")
    p.add_argument("--clients", default="1,4,8", help="serve: concurrent clients, comma list")
    p.add_argument("--requests", type=int, default=20, help="serve: requests per client")
    p.add_argument("--models", default="resnet50,vit_b_16,swin_b,dinov2_b")
    p.add_argument("--frozen", default="dinov2_b", help="comma list also benchmarked with a frozen backbone")
    p.add_argument("--epochs", type=int, default=10, help="timed epochs after warm-up (median reported)")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--device", default="auto")
    p.add_argument("--compile", default="none", choices=list(COMPILE_MODES),
                   help="torch.compile mode of the fine-tuning engine (the floor stays eager)")
    p.add_argument("--out", default="bench.json")
    p.add_argument("--manifest", default=None, help="faces: photos to time (default: a synthetic set)")
    p.add_argument("--limit", type=int, default=0, help="faces: at most this many photos")
    p.add_argument("--sam-checkpoint", default=None)


def _bench(ns: argparse.Namespace) -> int:
    if ns.what == "serve":
        from cushing.workflows.bench_serve import bench_serve
        from cushing.data.manifest import load_manifest
        from cushing.model.train import resolve_data

        photos = load_manifest(resolve_data(ns.manifest or "demo"), check_images=False).table["path"].tolist()
        bench_serve(model_uris=ns.model_uri, urls=ns.url, photos=photos[: ns.limit or None],
                    clients=tuple(int(c) for c in ns.clients.split(",")), per_client=ns.requests,
                    out=ns.out if ns.out != "bench.json" else "bench_serve.json")
        return 0
    if ns.what == "faces":
        from cushing.workflows.bench import bench_faces

        bench_faces(manifest=ns.manifest, limit=ns.limit, sam_checkpoint=ns.sam_checkpoint, out=ns.out)
        return 0
    if ns.what == "run":
        from cushing.workflows.bench import bench_run

        bench_run(model=ns.models.split(",")[0], img_size=ns.img_size, epochs=ns.epochs, device=ns.device,
                  out=ns.out)
        return 0
    from cushing.workflows.bench import run_bench

    run_bench(models=[m for m in ns.models.split(",") if m], frozen=[m for m in ns.frozen.split(",") if m],
              epochs=ns.epochs, img_size=ns.img_size, device=ns.device, out=ns.out, compile=ns.compile)
    return 0


COMMANDS["bench"] = ("time the engine's epoch against the compute floor (or the face stage)", _bench_args, _bench)


# ------------------------------------------------------------------------------------------------ faces

def _faces_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--manifest", required=True, help="photos: a manifest CSV (image, label, sex, ...)")
    p.add_argument("--out", required=True, help="folder for crops/, manifest.csv, faces_report.csv")
    p.add_argument("--sam-checkpoint", default=None, help="SAM weights (vit_h, vit_l or vit_b .pth)")
    p.add_argument("--sam-model-type", default=None, help="vit_h | vit_l | vit_b (default: read from the weights)")
    p.add_argument("--mask", default="auto", help="auto | sam | landmark_hull | none")
    p.add_argument("--detector", default="hog", help="hog | cnn (dlib's mmod detector)")
    p.add_argument("--max-upsample", type=int, default=2)
    p.add_argument("--margin", type=float, default=0.15)
    p.add_argument("--cache-dir", default=None, help="content-addressed cache (default ~/.cache/cushing/faces)")
    p.add_argument("--workers", type=int, default=0, help="dlib processes (default: one per core)")
    p.add_argument("--device", default="auto", help="where SAM runs")
    p.add_argument("--strict", action="store_true", help="exit non-zero if any photo was rejected")
    p.add_argument("--allow-phi-artifacts", default="false", help="true: log montages of crops and failures")
    p.add_argument("--experiment", default="cushing")
    p.add_argument("--no-track", action="store_true", help="do not log to MLflow")


def _faces(ns: argparse.Namespace) -> int:
    from cushing.config import parse_bool
    from cushing.faces.settings import FaceSettings
    from cushing.faces.run import run_faces

    settings = FaceSettings(detector=ns.detector, max_upsample=ns.max_upsample, margin=ns.margin, mask=ns.mask,
                            sam_checkpoint=ns.sam_checkpoint or None, sam_model_type=ns.sam_model_type or None,
                            device=ns.device)
    res = run_faces(manifest=ns.manifest, out=ns.out, settings=settings, cache_dir=ns.cache_dir or None,
                    workers=ns.workers, experiment=ns.experiment, allow_phi=parse_bool(ns.allow_phi_artifacts),
                    track=not ns.no_track)
    o = res.outcome
    rep = o.report
    print(f"extracted {o.extracted} of {len(rep)} photos ({o.cached} from cache, {o.processed} processed, "
          f"{o.seconds:.1f} s; mask: {o.settings.mask_method})")
    for reason, n in rep.loc[rep["status"] != "ok", "reason"].value_counts().items():
        print(f"  rejected {n:4d} {reason}")
    print(f"face-crop manifest: {o.manifest}\nreport: {o.manifest.parent / 'faces_report.csv'}")
    if res.run_id:
        print(f"audit logged to run {res.run_id}")
    if o.extracted == 0:
        print("cushing faces: no face could be extracted", file=sys.stderr)
        return 3
    if ns.strict and o.extracted < len(rep):
        print(f"cushing faces: --strict and {len(rep) - o.extracted} photos were rejected", file=sys.stderr)
        return 3
    return 0


COMMANDS["faces"] = ("extract aligned, masked face crops (dlib + SAM or landmark hull), cached", _faces_args, _faces)


# ------------------------------------------------------------------------------------------------ audit

def _audit_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--manifest", required=True, help="the cohort (manifest CSV, or demo)")
    p.add_argument("--out", required=True, help="folder for audit.csv (with --evaluate: the threshold tables)")
    p.add_argument("--no-faces", action="store_true", help="duplicates only: skip the same-person check (dlib)")
    p.add_argument("--workers", type=int, default=0, help="processes (default: one per core)")
    p.add_argument("--cache-dir", default=None, help="hash/descriptor cache (default ~/.cache/cushing/audit)")
    p.add_argument("--experiment", default="cushing")
    p.add_argument("--no-track", action="store_true", help="do not log to MLflow")
    p.add_argument("--evaluate", action="store_true",
                   help="measure the same-person and duplicate thresholds on a manifest of true identities")
    p.add_argument("--photos", type=int, default=2000, help="--evaluate: photos sampled for same-person pairs")


def _audit(ns: argparse.Namespace) -> int:
    from cushing.workflows.cohort_audit import run_audit, run_evaluation

    if ns.evaluate:
        table, dup = run_evaluation(manifest=ns.manifest, out=ns.out, photos=ns.photos, workers=ns.workers,
                                    cache_dir=ns.cache_dir)
        cols = ["threshold", "group", "pos_pairs", "precision", "precision_lo", "precision_hi", "recall",
                "recall_lo", "recall_hi", "false_pairs_per_343"]
        print(table[[c for c in cols if c in table.columns]].round(3).to_string(index=False))
        print(f"duplicates: {dup['false_pairs']} false pairs among {dup['stranger_pairs']:,} pairs of different "
              f"people (closest {dup['min_stranger_bits']} bits); copies found: {dup['copies_found']:.3f}")
        return 0
    res = run_audit(manifest=ns.manifest, out=ns.out, faces=not ns.no_faces, workers=ns.workers,
                    cache_dir=ns.cache_dir, experiment=ns.experiment, track=not ns.no_track)
    a = res.audit
    n = len(a.photos)
    print(f"{n} photos in {a.seconds:.2f} s ({n / max(a.seconds, 1e-9):.1f} photos/s; {a.computed} computed, "
          f"{a.cached} from cache){'' if res.faces else '; same-person check skipped (synthetic or --no-faces)'}")
    different = a.pairs[~a.pairs["same_subject"]]
    for kind, count in different["kind"].value_counts().items():
        print(f"  {count:4d} {kind} pairs of different subject ids")
    print(f"audit: {res.out}" + (f" (logged to run {res.run_id})" if res.run_id else ""))
    return 0


COMMANDS["audit"] = ("find the same photo, or the same person, under two subject ids (before splitting)",
                     _audit_args, _audit)


# ------------------------------------------------------------------------------------------------ explain

def _explain_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run-id", default=None, help="a training run: CAMs are logged into it")
    p.add_argument("--model", default=None, help="a model URI (models:/cushing@champion): CAMs go to a new run")
    p.add_argument("--manifest", default=None, help="images to explain (default: the run's own data, test split)")
    p.add_argument("--split", default="test", help="train/val/test, or all")
    p.add_argument("--allow-phi-artifacts", default="false", help="true: also per-image overlays (hashed names)")
    p.add_argument("--experiment", default="cushing")
    p.add_argument("--device", default="auto")


def _explain(ns: argparse.Namespace) -> int:
    from cushing.workflows.jobs import run_explain
    from cushing.config import parse_bool

    run_id, rep = run_explain(run_id=ns.run_id, model_uri=ns.model, manifest=ns.manifest, split=ns.split,
                              allow_phi=parse_bool(ns.allow_phi_artifacts), experiment=ns.experiment, device=ns.device)
    print(f"Grad-CAM for {int(rep.metrics.get('cam/images', 0))} images logged to run {run_id}: "
          f"cam/mean_*.png, cam_regions.csv; randomisation Spearman {rep.metrics.get('cam/randomization_spearman', float('nan')):.3f}")
    return 0


COMMANDS["explain"] = ("Grad-CAM aggregates for an existing run or registered model", _explain_args, _explain)


# ------------------------------------------------------------------------------------------------ evaluate

def _evaluate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="models:/cushing@champion, models:/cushing/3, runs:/ID/model")
    p.add_argument("--manifest", required=True, help="the external cohort (same manifest contract)")
    p.add_argument("--experiment", default="cushing")
    p.add_argument("--min-positives", type=int, default=5)
    p.add_argument("--bootstrap", type=int, default=2000)
    p.add_argument("--prevalence", type=_opt_float, default=None, help="screening prevalence for PPV/NPV")
    p.add_argument("--seed", type=int, default=0)


def _evaluate(ns: argparse.Namespace) -> int:
    from cushing.workflows.jobs import run_evaluate

    res = run_evaluate(model_uri=ns.model, manifest=ns.manifest, experiment=ns.experiment,
                       min_positives=ns.min_positives, bootstrap=ns.bootstrap, seed=ns.seed, prevalence=ns.prevalence)
    print(f"external validation run {res.run_id}")
    print(res.report.per_sex.to_string(index=False, columns=[c for c in ("group", "n", "positives", "recall",
          "specificity", "f1", "auc") if c in res.report.per_sex.columns]))
    return 0


COMMANDS["evaluate"] = ("score a registered model on a new cohort (external validation)", _evaluate_args, _evaluate)


# ------------------------------------------------------------------------------------------------ compare

def _compare_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_ids", nargs="*", help="runs evaluated on the same test subjects")
    _scope_options(p, "compare")
    p.add_argument("--log", action="store_true", help="log comparison.csv (to the parent run, or a new run)")


def _compare(ns: argparse.Namespace) -> int:
    from cushing.workflows.jobs import compare_runs
    from cushing.tracking import find_runs

    ids = list(ns.run_ids)
    scope = _scope(ns)
    if scope.parent_run_id:
        ids += [r.run_id for r in find_runs(scope.experiment, parent_run_id=scope.parent_run_id)
                if r.status == "FINISHED" and "model_uri" in r.tags]
    res = compare_runs(ids, log_to=(scope.parent_run_id or "") if ns.log else None, experiment=scope.experiment)
    cols = ["model_a", "model_b", "n", "auc_a", "auc_b", "delong_p", "delong_p_holm", "acc_a", "acc_b",
            "mcnemar_p", "mcnemar_p_holm"]
    print(res.table[cols].to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    if res.run_id:
        print(f"logged comparison.csv to run {res.run_id}")
    return 0


COMMANDS["compare"] = ("paired DeLong and McNemar tests between runs (Holm-corrected)", _compare_args, _compare)


# ------------------------------------------------------------------------------------------------ promote

def _scope_options(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--experiment", default=None,
                   help="experiment to look in (default: that of --parent-run or --project, else "
                        "MLFLOW_EXPERIMENT_NAME or the `mlflow run` run's, else cushing)")
    p.add_argument("--parent-run", default=None, help=f"{what} only the children of this (sweep) run")
    p.add_argument("--project", default=None, help="a study file: its experiment and its sweep's parent run"
                                                   " (and, for promote, its `promote:` policy)")
    p.add_argument("--storage", default=None, help="the study's Optuna storage (default as for `cushing sweep`)")


def _scope(ns: argparse.Namespace):
    from cushing.workflows.sweeps import resolve_scope

    return resolve_scope(experiment=ns.experiment or None, parent_run_id=ns.parent_run or None,
                         project=ns.project or None, storage=ns.storage or None)


def _promote_args(p: argparse.ArgumentParser) -> None:
    _scope_options(p, "rank")
    p.add_argument("--metric", default=None, help="validation metric to rank on (default val/f1)")
    p.add_argument("--min-value", type=_opt_float, default=None, help="gate: the metric must reach this")
    p.add_argument("--max-sex-gap", type=_opt_float, default=None, help="gate: |female - male| of the metric")
    p.add_argument("--max-subgroup-gap", type=_opt_float, default=None,
                   help="gate: best - worst subgroup of the metric, for every subgroup column other than sex")
    p.add_argument("--allow-synthetic", default="false", metavar="BOOL",
                   help="true: a model trained on synthetic data (the demo cohort) may become champion")


def _promote(ns: argparse.Namespace) -> int:
    from cushing.config import parse_bool
    from cushing.release.registry import PromotionPolicy, promote
    from cushing.workflows.studies import promotion_overrides

    base = promotion_overrides(ns.project) if ns.project else {}
    given = {k: v for k, v in (("metric", ns.metric), ("min_value", ns.min_value), ("max_sex_gap", ns.max_sex_gap),
                               ("max_subgroup_gap", ns.max_subgroup_gap)) if v not in (None, "")}
    policy = PromotionPolicy(**{**base, **given, "allow_synthetic": parse_bool(ns.allow_synthetic)})
    scope = _scope(ns)
    print(f"ranking runs of {scope.how} in experiment {scope.experiment!r}")
    d = promote(experiment=scope.experiment, policy=policy, parent_run_id=scope.parent_run_id)
    if not d.ranking.empty:
        cols = ["rank", "run_name", policy.metric, "sex_gap", "val/auc", "test/f1 (not used)", "eligible",
                "excluded_because"]
        print(d.ranking[cols].to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    print(d.reason if d.changed or d.winner_run is None else f"no change: {d.reason}")
    if d.logged_run:
        print(f"decision logged to run {d.logged_run}")
    return 0 if d.winner_run else 1


COMMANDS["promote"] = ("register the best run on validation; move challenger/champion aliases", _promote_args,
                       _promote)


# ------------------------------------------------------------------------------------------------ sweep / tune

def _sweep_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("project", help="a sweep study file, e.g. projects/paper.yaml")
    p.add_argument("--storage", default=None, help="Optuna storage URL shared by workers (default: SQLite next to "
                                                   "the MLflow store; postgresql://... for several hosts)")
    p.add_argument("--workers", type=_workers, default=None, metavar="N|auto",
                   help="trainings at once on this host, as processes (default auto: 2 with a CUDA GPU, else 1)")
    p.add_argument("--report", action="store_true", help="only print Table II and III from the tracking store")
    p.add_argument("--plan", action="store_true",
                   help="only print the estimated wall time on one H200 for 1, 2 and 4 workers (trains nothing)")
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


def _count(text: str, unset: tuple[str, ...], what: str, least: str) -> int | None:
    """A positive count, or None for the texts that mean unset (MLproject passes '' for an unset parameter)."""
    if text in unset:
        return None
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{what}, got {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"{least}, got {n}")
    return n


def _opt_count(text: str) -> int | None:
    """A positive count, or None for '' (MLproject's unset)."""
    return _count(text, ("", "None", "0"), "a positive number", "a positive number")


def _yes(text: str) -> bool:
    value = {"": False, "true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}.get(
        str(text).strip().lower())
    if value is None:
        raise argparse.ArgumentTypeError(f"true or false, got {text!r}")
    return value


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
    kwargs = {"partition": ns.slurm_partition or None, "account": ns.slurm_account or None,
              "time_min": ns.slurm_time or DEFAULT_TIME_MIN, "gpus_per_task": ns.slurm_gpus,
              "cpus_per_task": ns.slurm_cpus, "mem_gb": ns.slurm_mem_gb, "array": ns.array,
              "max_parallel": ns.max_parallel, "extra": extra, "requeue": not ns.no_requeue}
    if ns.slurm_logs:
        kwargs["folder"] = Path(ns.slurm_logs)
    return SlurmOptions(**kwargs)


def _sweep_on_slurm(ns: argparse.Namespace) -> int:
    from cushing.workflows.cluster import ClusterError, submit_sweep

    if ns.workers and ns.workers > 1:
        print("cushing sweep: --workers counts processes on this host; with --launcher slurm each array task is one "
              "worker: use --array N", file=sys.stderr)
        return 2
    try:
        sub = submit_sweep(ns.project, _slurm_options(ns), storage=ns.storage or None, compile=ns.compile,
                           wait=ns.wait)
    except ClusterError as e:
        print(f"cushing sweep: {e}", file=sys.stderr)
        return 2
    if sub.sweep is not None:
        _print_sweep_result(sub.sweep)
    return 0


def _print_sweep_result(res) -> None:
    print(f"sweep {res.study_name}: parent run {res.parent_run_id}, {res.seconds:.0f} s"
          + (f", trained {res.trained} here" if res.trained >= 0 else ""))
    for r in res.retried:
        print(f"  retried: trial {r['retry_of']} ({r['config']}) as trial {r['trial']} -> {r['state']}")
    _print_tables(res.table2, res.table3)


def _workers(text: str) -> int | None:
    """A worker count, or None for auto."""
    return _count(text, ("", "auto", "0"), "a number of workers or auto", "at least 1 worker")


def _compile_mode(text: str) -> str | None:
    """A compile mode, or None for '' (MLproject's unset)."""
    if text in ("", "None"):
        return None
    if text not in COMPILE_MODES:
        raise argparse.ArgumentTypeError(f"one of {', '.join(COMPILE_MODES)}, got {text!r}")
    return text


def _compile_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--compile", default=None, type=_compile_mode, metavar="MODE",
                   help=f"{' | '.join(COMPILE_MODES)}: torch.compile mode for every fine-tuned configuration "
                        "(default: the file's); pays off with a warm compile cache (a rerun, other folds, seeds or "
                        "trials of the same architecture)")


def _print_plan(project: str, workers: int | None, compile: str | None) -> None:
    from cushing.workflows.sweeps import plan_sweep

    counts = sorted({1, 2, 4, workers or 1})
    table, wall = plan_sweep(project, counts, compile)
    print(table.to_string(index=False, float_format=lambda v: f"{v:.0f}"))
    how = "cold compile cache" if compile and compile != "none" else "as the file says"
    print(f"\nestimated wall time on one NVIDIA H200 (registry epoch costs, compile: {how}; other GPUs scale; "
          "measure with the sweep itself):")
    for w, sec in wall.items():
        print(f"  --workers {w}: {sec / 60:5.1f} min")


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
    from cushing.workflows.sweeps import default_storage, load_for, report_sweep, run_sweep, sweep_worker

    if ns.plan:
        _print_plan(ns.project, ns.workers, ns.compile)
        return 0
    if ns.worker:
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
        return _sweep_on_slurm(ns)
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


def _tune_on_slurm(ns: argparse.Namespace) -> int:
    from cushing.workflows.cluster import ClusterError, submit_tune

    try:
        sub = submit_tune(ns.project, _slurm_options(ns), storage=ns.storage or None, n_trials=ns.n_trials or None,
                          compile=ns.compile, wait=ns.wait)
    except ClusterError as e:
        print(f"cushing tune: {e}", file=sys.stderr)
        return 2
    if sub.tune is not None:
        _print_tune_result(sub.tune)
    return 0


def _print_tune_result(res) -> None:
    print(f"tune {res.study_name}: parent run {res.parent_run_id}; {res.n_complete} complete, {res.n_pruned} pruned")
    print(f"best value {res.best_value:.4f} with {res.best_params}")
    if not res.importances.empty:
        print(res.importances.to_string(index=False))


def _tune(ns: argparse.Namespace) -> int:
    from cushing.workflows.sweeps import run_tune

    if ns.launcher == "slurm":
        return _tune_on_slurm(ns)
    res = run_tune(ns.project, storage=ns.storage or None, n_trials=ns.n_trials or None, compile=ns.compile)
    _print_tune_result(res)
    return 0


COMMANDS["tune"] = ("Optuna TPE search with pruning; trials as nested MLflow runs", _tune_args, _tune)


# ------------------------------------------------------------------------------------------------ dashboard

def _dashboard_args(p: argparse.ArgumentParser) -> None:
    _scope_options(p, "show")
    p.add_argument("--out", default="dashboard.html")
    p.add_argument("--definition", default="paper", help="a dashboards/<name>.yaml definition")
    p.add_argument("--no-log", action="store_true", help="do not log the page to MLflow")


def _dashboard(ns: argparse.Namespace) -> int:
    from cushing.workflows.dashboard import DashboardError, build_dashboard

    scope = _scope(ns)
    try:
        path = build_dashboard(experiment=scope.experiment, parent_run_id=scope.parent_run_id, out=ns.out,
                               name=ns.definition, log=not ns.no_log)
    except DashboardError as e:
        print(f"cushing dashboard: {e}", file=sys.stderr)
        return 1
    print(f"wrote {path} from {scope.how} (self-contained; open it in a browser or in the MLflow UI's artifact "
          "view)")
    return 0


COMMANDS["dashboard"] = ("build the self-contained HTML dashboard (Tables I-III, ROC, calibration, CAMs)",
                         _dashboard_args, _dashboard)


# ------------------------------------------------------------------------------------------------ stack

def _stack_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=["up", "down", "restart", "mlflow-server", "migrate"],
                   help="up/down/restart: a throwaway PostgreSQL + mlflow server on 127.0.0.1 (no Docker); "
                        "mlflow-server/migrate: what the docker-compose services run")
    p.add_argument("--dir", default=".stack", help="up/down/restart: where the stack's state, logs, artifacts "
                                                   "and env.sh live")
    p.add_argument("--port", type=int, default=5000, help="MLflow server port")
    p.add_argument("--pg-port", type=int, default=0, help="PostgreSQL port (default: a free one)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--db-host", default="postgres")
    p.add_argument("--db-port", type=int, default=5432)
    p.add_argument("--db-password-file", default=None)
    p.add_argument("--admin-password-file", default=None)
    p.add_argument("--secret-key-file", default=None)
    p.add_argument("--artifacts", default="/mlartifacts")
    p.add_argument("--allowed-hosts", default="127.0.0.1:5000,localhost:5000")
    p.add_argument("--workers", type=int, default=4)


def _stack(ns: argparse.Namespace) -> int:
    import os

    from cushing.ops import stack

    if ns.action == "mlflow-server":
        stack.exec_mlflow_server(db_host=ns.db_host, db_port=ns.db_port, db_password_file=ns.db_password_file,
                                 admin_password_file=ns.admin_password_file, secret_key_file=ns.secret_key_file,
                                 artifacts=ns.artifacts, host=ns.host, port=ns.port, allowed_hosts=ns.allowed_hosts,
                                 workers=ns.workers)
        return 0
    if ns.action == "migrate":
        stack.migrate_from_secrets(db_host=ns.db_host, db_port=ns.db_port, db_password_file=ns.db_password_file)
        print("mlflow db upgrade: done")
        return 0
    base = Path(ns.dir).resolve()
    saved = (base / "stack.json").exists()
    if ns.action in ("down", "restart") and not saved:
        print(f"no stack in {base} (no stack.json): nothing to {ns.action}", file=sys.stderr)
        return 1
    if ns.action == "down":
        return _stack_down(base, ns.dir)
    if ns.action == "restart":
        s = stack.restart_saved(base)
        print(f"restarted: PostgreSQL on 127.0.0.1:{s.pg.port}, MLflow server on {s.server.url}")
        return 0
    if saved:
        print(f"{base} already holds a stack; `cushing stack down --dir {ns.dir}` first", file=sys.stderr)
        return 1
    kw = {"admin_password": os.environ["MLFLOW_ADMIN_PASSWORD"]} if os.environ.get("MLFLOW_ADMIN_PASSWORD") else {}
    s = stack.LocalStack(base=base, pg_port=ns.pg_port, port=ns.port, **kw).start()
    s.save_state()
    env = s.write_env_file()
    where = "" if str(s.pg.root).startswith(str(base)) else f" (cluster in {s.pg.root}: the postgres user cannot " \
                                                               f"enter {base})"
    print(f"PostgreSQL on 127.0.0.1:{s.pg.port}{where}, MLflow server (basic-auth) on {s.server.url}\n"
          f"credentials and URIs: source {env}\nstop with: cushing stack down --dir {ns.dir}")
    return 0


def _stack_down(base: Path, name: str) -> int:
    import json
    import shutil

    from cushing.ops import stack

    state = json.loads((base / "stack.json").read_text())
    problems = stack.stop_saved(base)
    if problems:
        print("cushing stack down: could not stop everything, so nothing was removed: " + "; ".join(problems),
              file=sys.stderr)
        return 1
    shutil.rmtree(base, ignore_errors=True)
    if state.get("pg_root") and not state["pg_root"].startswith(str(base)):
        shutil.rmtree(state["pg_root"], ignore_errors=True)
    print(f"stopped the MLflow server on port {state['port']} and PostgreSQL, removed {base}")
    return 0


COMMANDS["stack"] = ("PostgreSQL + MLflow server (basic-auth) without Docker; the compose services' commands",
                     _stack_args, _stack)


# ------------------------------------------------------------------------------------------------ main

def build_parser() -> argparse.ArgumentParser:
    from cushing import __version__

    parser = argparse.ArgumentParser(prog="cushing", description=__doc__)
    parser.add_argument("--version", action="version", version=f"cushing {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (help_, configure, fn) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        configure(p)
        p.set_defaults(func=fn)
    return parser


class Terminated(KeyboardInterrupt):
    """SIGTERM (docker stop, a scheduler, a CI timeout), handled like Ctrl-C: the run ends KILLED."""

    def __init__(self, signum: int):
        super().__init__()
        self.signame = signal.Signals(signum).name


def _on_signal(signum, frame) -> None:
    """The first SIGINT or SIGTERM stops the command; later ones are ignored, so the cleanup they would cut short
    (ending the run KILLED, telling Optuna the trial's fate, a launcher waiting for its workers) always finishes.
    A terminal's Ctrl-C reaches every process of its group at once, and schedulers follow SIGTERM with more."""
    for sig in (signal.SIGINT, signal.SIGTERM):  # a Python no-op, not SIG_IGN: a signal already pending when the
        signal.signal(sig, _ignore)  # handler changes to SIG_IGN is raised as "OSError: ignored due to race condition"
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    raise Terminated(signum)


def _ignore(signum, frame) -> None:
    pass


def _ignore_until_exit() -> None:
    """After the cleanup: SIG_IGN proper, so interpreter shutdown (which puts SIG_DFL back in place of Python
    handlers) cannot be killed by a late signal. One that lands while switching is dropped with its OSError."""
    try:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)
        _ignore(0, None)  # entering a Python function runs the pending-signal check inside this try
    except OSError:
        pass


def _resume_hint(run: str) -> str:
    from cushing.model.checkpoint import has_local_checkpoint
    from cushing.tracking import get_run

    try:
        saved = has_local_checkpoint(run) or "checkpoint_epoch" in get_run(run).tags
    except Exception:  # the tracking store went away too: say what is certain
        saved = has_local_checkpoint(run)
    if saved:
        return f" (continue it from its last checkpoint: cushing train --resume {run})"
    return " (it stopped before its first checkpoint, see checkpoint_minutes: train it again)"


def _stopped(command: str, e: KeyboardInterrupt) -> int:
    """One line instead of a traceback: what stopped, which run is KILLED, how to continue it."""
    name = getattr(e, "signame", "SIGINT")
    run = getattr(e, "cushing_run", None)
    where = f"; run {run} is marked KILLED" if run else ""
    hint = _resume_hint(run) if run and command == "train" else ""
    print(f"cushing {command}: stopped by {name}{where}{hint}", file=sys.stderr)
    return 128 + (signal.SIGTERM if name == "SIGTERM" else signal.SIGINT)


def main(argv: Sequence[str] | None = None) -> int:
    from cushing.data.manifest import ManifestError
    from cushing.data.splits import SplitError

    parser = build_parser()
    ns = parser.parse_args(argv)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _on_signal)
        if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # not when the parent ignores it
            signal.signal(signal.SIGINT, _on_signal)
    try:
        return int(ns.func(ns) or 0)
    except KeyboardInterrupt as e:
        code = _stopped(ns.command, e)
        if signal.getsignal(signal.SIGTERM) is _ignore:
            _ignore_until_exit()
        return code
    except (ConfigError, ManifestError, SplitError, _stack_error()) as e:
        print(f"cushing {ns.command}: {e}", file=sys.stderr)
        return 2
    except _user_errors() as e:
        print(f"cushing {ns.command}: {e}", file=sys.stderr)
        return 2


def _stack_error() -> type[BaseException]:
    from cushing.ops.stack import StackError

    return StackError


def _user_errors() -> tuple[type[BaseException], ...]:
    from cushing.model.backbones import WeightsUnavailable
    from cushing.workflows.experiment import ResumeError
    from cushing.stats.subgroups import SubgroupError
    from cushing.tracking import TrackingUnavailable
    from cushing.model.train import AuditError

    return (WeightsUnavailable, FileNotFoundError, TrackingUnavailable, ResumeError, AuditError, SubgroupError)


if __name__ == "__main__":
    sys.exit(main())
