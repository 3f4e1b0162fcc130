"""What a pipeline is asked to do (`PipelineSpec`) and what its steps are keyed on: content digests of files and
manifests, the code version (a digest of the package's sources: no git needed), and the study it trains (the
user's study file, or one model on its protocol, with the face crops as its data). Nothing here touches MLflow."""
from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import shlex
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from cushing import tracking
from cushing.config import ConfigError, TrainConfig, config_digest, resolve, run_name
from cushing.data.manifest import load_manifest, sha256_file
from cushing.data.checks import check_cohort
from cushing.tracking.stores import sqlite_path
from cushing.workflows.studies import Study, load_study

__all__ = ["PipelineSpec", "user_folders", "resolve_input", "default_out", "manifest_digest",
           "code_version", "step_key", "derived_study", "study_of", "write_study", "parse_overrides", "study_identity",
           "run_digests", "validate_inputs", "PROJECT_ROOT"]

PROJECT_ROOT = Path(__file__).resolve().parents[3]  # the clone: projects/, dashboards/, MLproject
PIPELINE_FIXED = ("data", "experiment", "run_name", "resume")  # what the pipeline sets itself, never --set


@dataclass(frozen=True)
class PipelineSpec:
    """What the user asked for, with every path absolute (so that the resume command works from anywhere)."""

    photos: Path
    study: Path
    out: Path
    model: str | None = None  # one configuration on the study's protocol instead of its grid
    overrides: tuple[tuple[str, str], ...] = ()  # --set KEY=VALUE, for every configuration
    external: Path | None = None
    experiment: str | None = None  # None: `mlflow run`'s run's, else MLFLOW_EXPERIMENT_NAME, else the study's
    workers: int | None = None
    gpu: str | None = None  # a GPU named for the estimate (h200)
    sam_checkpoint: str | None = None
    skip_bad_photos: bool = False  # leave out photos that cannot be found, read or cropped instead of stopping

    def command(self, experiment: str, tracking_uri: str | None = None) -> str:
        """The same pipeline as one `cushing pipeline` command line: what resumes it."""
        args = ["cushing", "pipeline", "--photos", str(self.photos), "--study", str(self.study),
                *(["--model", self.model] if self.model else []),
                *(a for k, v in self.overrides for a in ("--set", f"{k}={v}")),
                *(["--external", str(self.external)] if self.external else []),
                "--out", str(self.out), "--experiment", experiment,
                *(["--workers", str(self.workers)] if self.workers else []),
                *(["--sam-checkpoint", self.sam_checkpoint] if self.sam_checkpoint else []),
                *(["--skip-bad-photos", "true"] if self.skip_bad_photos else [])]
        prefix = f"MLFLOW_TRACKING_URI={shlex.quote(tracking_uri)} " if tracking_uri else ""
        return prefix + shlex.join(args)


def manifest_digest(path: str | Path) -> str:
    """The manifest's bytes and the bytes of every image it names (relative to its folder, as the contract says),
    in its order. Nothing is validated here: a row that names no readable file counts as missing, and the step
    that reads the manifest says what is wrong with it."""
    path = Path(path)
    h = hashlib.sha256(path.read_bytes())
    try:
        with open(path, newline="") as f:
            images = [row.get("image", "") or "" for row in csv.DictReader(f)]
    except (UnicodeDecodeError, csv.Error):
        images = []
    for name in images:
        p = (path.parent / name.strip()) if name.strip() else None
        try:
            h.update(sha256_file(p).encode() if p is not None and p.is_file() else b"missing")
        except OSError:
            h.update(b"unreadable")
    return h.hexdigest()


def code_version(*folders: Path) -> str:
    """A digest of the package's Python sources (and of any folder given, e.g. the dashboard definitions): the
    code a step ran, without git (MLflow's multistep example uses the git commit)."""
    root = Path(__file__).resolve().parents[2]
    h = hashlib.sha256()
    files = [(root, p) for p in sorted(root.rglob("*.py"))]
    files += [(f, p) for f in folders if f.is_dir() for p in sorted(f.rglob("*")) if p.is_file()]
    for base, p in files:
        h.update(str(p.relative_to(base)).encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def step_key(step: str, inputs: dict[str, Any]) -> str:
    """What identifies a step's work: its name and inputs (digests, parameters, code, upstream outputs)."""
    text = json.dumps({"step": step, **inputs}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def user_folders() -> list[Path]:
    """Where a relative path means something to the user: the working directory, and under `mlflow run` (which
    works in the project folder) the folder holding the embedded tracking store, where `mlflow run` was typed."""
    folders = [Path.cwd()]
    store = sqlite_path(tracking.tracking_uri())
    if tracking.env_run_id() and store is not None and store.parent.resolve() != Path.cwd().resolve():
        folders.append(store.parent)
    return folders


def resolve_input(text: str, what: str, *, project: bool = False) -> Path:
    """An input file named on the command line: absolute, or relative to `user_folders()` (then, with `project`,
    to the project folder: `projects/paper.yaml` works from a study folder)."""
    p = Path(text).expanduser()
    candidates = [p] if p.is_absolute() else [f / p for f in user_folders()]
    candidates += [PROJECT_ROOT / p] if project and not p.is_absolute() else []
    for c in candidates:
        if c.is_file():
            return c.resolve()
    raise FileNotFoundError(f"{text}: {what} was not found (looked for {', '.join(str(c) for c in candidates)})")


def default_out() -> Path:
    """The pipeline folder when none is given: `pipeline/` in the user's folder."""
    return user_folders()[-1] / "pipeline"


def parse_overrides(items: list[str]) -> tuple[tuple[str, str], ...]:
    """--set KEY=VALUE items (several in one item separated by spaces; MLproject's '' is none), each a training
    option checked against the typed configuration."""
    pairs = []
    for item in (x for value in items for x in value.split() if x not in ("''", '""')):
        key, sep, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise ConfigError(f"--set: expected KEY=VALUE, got {item!r}")
        if key in PIPELINE_FIXED:
            raise ConfigError(f"--set {key}: the pipeline sets {key} itself (data: the face crops; experiment: "
                              "--experiment or mlflow run's)")
        pairs.append((key, value))
    resolve(TrainConfig, dict(pairs), source="--set")  # unknown or mistyped keys are errors now
    return tuple(pairs)


def derived_study(spec: PipelineSpec, *, data: str, data_digest: str, experiment: str) -> dict[str, Any]:
    """The study the pipeline trains, as a study file's mapping: the user's file with the crops as data, --set on
    the base and every configuration, one configuration when a model is named; its name carries the crops' digest
    (new crops are a new sweep) and, with --set, the overrides' digest (its labels carry the overrides)."""
    user = load_study(spec.study)  # checked first: its errors name the user's file and line
    if user.kind != "sweep":
        raise ConfigError(f"{spec.study} is a {user.kind} study; the pipeline runs a sweep study (or --model)")
    data_map = yaml.safe_load(spec.study.read_text())
    sets = dict(spec.overrides)
    base = {**(data_map.get("base") or {}), **sets, "data": data}
    confs = [{"model": spec.model}] if spec.model else (data_map.get("configurations") or [])
    confs = [{**{k: v for k, v in c.items() if k not in PIPELINE_FIXED}, **sets} for c in confs]
    name = f"{user.name}-{data_digest[:8]}"
    if sets:  # told apart from the study's other sweeps in the run list: by name, and each configuration's label
        text = ",".join(f"{k}={v}" for k, v in sorted(sets.items()))
        name += f"-set-{hashlib.sha256(text.encode()).hexdigest()[:6]}"
        for c in confs:
            own = c.pop("label", None) or run_name(user.config_for(c))
            c["label"] = f"{own}[{text}]"
    return {**data_map, "name": name, "experiment": experiment, "base": base, "configurations": confs}


def write_study(mapping: dict[str, Any], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("# written by `cushing pipeline`: the study it trains (do not edit; edit your study file)\n"
                    + yaml.safe_dump(mapping, sort_keys=False))
    return path


def study_of(mapping: dict[str, Any]) -> Study:
    """The Study a derived mapping describes, loaded (and validated) through a temporary file: planning writes
    nothing where the user looks."""
    with tempfile.TemporaryDirectory(prefix="cushing-study-") as folder:
        return load_study(write_study(mapping, Path(folder) / "cushing-study.yaml"))


def validate_inputs(spec: PipelineSpec, study: Study) -> None:
    """What is checked before the pipeline makes a run, a folder or a lock, so that a refused input leaves nothing
    behind: the photos' manifest with every photo in it, the external cohort's, and whether the cohort can support
    a claim under each configuration (`check_cohort`, on the photos: training checks again on the crops)."""
    photos = load_manifest(spec.photos, skip_bad_photos=spec.skip_bad_photos)
    if spec.external:
        load_manifest(spec.external)
    for cfg in study.configurations:
        check_cohort(cfg, photos)


def study_identity(study: Study) -> dict[str, Any]:
    """What the sweep trains: each configuration's identity (as its training run's `config_digest` tag holds it)
    and the objective."""
    return {"name": study.name, "labels": list(study.labels), "objective": [study.objective_metric, study.direction],
            "experiment": study.experiment, "configurations": run_digests(study)}


def run_digests(study: Study) -> list[str]:
    """The `config_digest` tag each configuration's training run gets (the worker sets the study's experiment)."""
    return [config_digest(dataclasses.replace(c, experiment=study.experiment)) for c in study.configurations]
