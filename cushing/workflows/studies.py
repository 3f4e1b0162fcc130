"""Study files (projects/*.yaml): a sweep grid or a tuning space, validated with line numbers. A study overrides only
what differs from TrainConfig's defaults. Unknown keys, unknown model names, mistyped values and bad ranges are errors
that name the file and line.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cushing.config import (EXECUTION_FIELDS, ConfigError, TrainConfig, lines_under, load_yaml_with_lines, resolve,
                            run_name)
from cushing.stats.metrics import final_metric_problem, lower_is_better

__all__ = ["Study", "SearchParam", "load_study", "STUDY_KEYS", "with_execution"]

STUDY_KEYS = {"name", "kind", "description", "experiment", "base", "configurations", "promote", "objective",
              "n_trials", "sampler", "pruner", "space"}
PROMOTE_KEYS = {"metric", "min_value", "max_sex_gap", "max_subgroup_gap"}
OBJECTIVE_KEYS = {"metric", "direction"}
PRUNERS = {"median": {"n_startup_trials", "n_warmup_steps", "interval_steps"},
           "successive_halving": {"min_resource", "reduction_factor", "min_early_stopping_rate"},
           "none": set()}
SAMPLERS = {"tpe": {"seed", "n_startup_trials", "multivariate"}, "random": {"seed"}}


@dataclass(frozen=True)
class SearchParam:
    name: str
    type: str  # float | int | categorical
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: tuple = ()


@dataclass(frozen=True)
class Study:
    path: Path
    name: str
    kind: str  # sweep | tune
    experiment: str  # "" when the file names none: resolved where it is used (sweeps/storage.py load_for)
    base: dict[str, Any]
    configurations: tuple[TrainConfig, ...] = ()
    labels: tuple[str, ...] = ()  # one per configuration: what the paper calls it
    promote: dict[str, Any] = field(default_factory=dict)
    objective_metric: str = "val/f1"
    direction: str = "maximize"
    n_trials: int = 20
    sampler: dict[str, Any] = field(default_factory=dict)
    pruner: dict[str, Any] = field(default_factory=dict)
    space: tuple[SearchParam, ...] = ()

    def config_for(self, overrides: dict[str, Any]) -> TrainConfig:
        return resolve(TrainConfig, {**self.base, **overrides}, source=str(self.path))


def _err(path, lines, key_path: tuple, msg: str) -> str:
    line = lines.get(key_path)
    return f"{path}:{line}: {msg}" if line else f"{path}: {msg}"


def _check_keys(path, lines, prefix: tuple, data: dict, allowed: set, what: str, problems: list) -> None:
    if not isinstance(data, dict):
        problems.append(_err(path, lines, prefix, f"{what} must be a mapping"))
        return
    problems += [_err(path, lines, prefix + (k,), f"unknown key {k!r} in {what}; allowed: {', '.join(sorted(allowed))}")
                 for k in data if k not in allowed]


def _train_config(path, lines, prefix: tuple, overrides: dict, problems: list) -> TrainConfig | None:
    try:
        cfg = resolve(TrainConfig, overrides, lines=lines_under(lines, prefix), source=str(path))
    except ConfigError as e:
        problems.append(str(e).replace("invalid configuration:\n  ", "").replace("\n  ", "; ")
                        if lines.get(prefix) is None else f"{path}:{lines[prefix]}: {e}")
        return None
    if many := [f"{k}={getattr(cfg, k)}" for k in ("cv_folds", "seeds") if getattr(cfg, k) > 1]:
        problems.append(_err(path, lines, prefix, f"{' and '.join(many)}: a study trains each configuration once, on "
                             "the split (cross-validation and repeated seeds are `cushing train` options)"))
    return cfg


def _space(path, lines, space: dict, problems: list) -> tuple[SearchParam, ...]:
    hints = typing.get_type_hints(TrainConfig)
    out = []
    for name, spec in (space or {}).items():
        where = ("space", name)
        if name not in hints:
            problems.append(_err(path, lines, where, f"search parameter {name!r} is not a training option"))
            continue
        if not isinstance(spec, dict) or spec.get("type") not in ("float", "int", "categorical"):
            problems.append(_err(path, lines, where, f"{name}: needs type float, int or categorical"))
            continue
        allowed = {"type", "low", "high", "log", "step"} if spec["type"] != "categorical" else {"type", "choices"}
        _check_keys(path, lines, where, spec, allowed, f"space.{name}", problems)
        if spec["type"] == "categorical":
            choices = spec.get("choices")
            if not isinstance(choices, list) or not choices:
                problems.append(_err(path, lines, where, f"{name}: choices must be a non-empty list"))
                continue
            for c in choices:
                try:
                    resolve(TrainConfig, {name: c})
                except ConfigError as e:
                    problems.append(_err(path, lines, where, f"{name}: choice {c!r} is invalid ({e})"))
            out.append(SearchParam(name, "categorical", choices=tuple(choices)))
            continue
        low, high = spec.get("low"), spec.get("high")
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (low, high)):
            problems.append(_err(path, lines, where, f"{name}: low and high must be numbers"))
            continue
        if not low < high:
            problems.append(_err(path, lines, where, f"{name}: low ({low}) must be below high ({high})"))
        if spec.get("log") and low <= 0:
            problems.append(_err(path, lines, where, f"{name}: a log range needs low > 0"))
        for v in (low, high):
            try:
                resolve(TrainConfig, {name: int(v) if spec["type"] == "int" else v})
            except ConfigError as e:
                problems.append(_err(path, lines, where, f"{name}: bound {v} is invalid ({e})"))
        out.append(SearchParam(name, spec["type"], float(low), float(high), bool(spec.get("log", False)),
                               spec.get("step")))
    return tuple(out)


def _named_section(path, lines, data: dict, key: str, kinds: dict[str, set], problems: list) -> dict:
    sec = data.get(key) or {}
    if not isinstance(sec, dict):
        problems.append(_err(path, lines, (key,), f"{key} must be a mapping"))
        return {}
    kind = sec.get("type", next(iter(kinds)))
    if kind not in kinds:
        problems.append(_err(path, lines, (key, "type"), f"{key}.type must be one of {', '.join(kinds)}"))
        return {}
    _check_keys(path, lines, (key,), sec, kinds[kind] | {"type"}, key, problems)
    return {**sec, "type": kind}


def load_study(path: str | Path) -> Study:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: study file not found")
    data, lines = load_yaml_with_lines(path)
    problems: list[str] = []
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a study file is a YAML mapping")
    _check_keys(path, lines, (), data, STUDY_KEYS, "the study", problems)
    kind = data.get("kind")
    if kind not in ("sweep", "tune"):
        problems.append(_err(path, lines, ("kind",), "kind must be sweep or tune"))
    base = data.get("base") or {}
    base_cfg = _train_config(path, lines, ("base",), base, problems) if isinstance(base, dict) else None
    if not isinstance(base, dict):
        problems.append(_err(path, lines, ("base",), "base must be a mapping of training options"))
        base = {}
    configs, labels = [], []
    for i, conf in enumerate(data.get("configurations") or []):
        if not isinstance(conf, dict):
            problems.append(_err(path, lines, ("configurations", i), "a configuration is a mapping"))
            continue
        label = conf.pop("label", None)
        cfg = _train_config(path, lines, ("configurations", i), {**base, **conf}, problems)
        if cfg is not None:
            configs.append(cfg)
            labels.append(str(label or run_name(cfg)))
    if kind == "sweep" and not configs and not problems:
        problems.append(_err(path, lines, ("configurations",), "a sweep needs at least one configuration"))
    if len(set(labels)) != len(labels):
        problems.append(f"{path}: configuration labels must be unique (got {labels})")
    promote, objective = data.get("promote") or {}, data.get("objective") or {}
    _check_keys(path, lines, ("promote",), promote, PROMOTE_KEYS, "promote", problems)
    _check_keys(path, lines, ("objective",), objective, OBJECTIVE_KEYS, "objective", problems)
    metric = objective.get("metric", "val/f1")
    if not str(metric).startswith("val/"):
        problems.append(_err(path, lines, ("objective", "metric"), "the objective must be a validation metric"))
    elif why := final_metric_problem(str(metric)):
        problems.append(_err(path, lines, ("objective", "metric"), why))
    direction = objective.get("direction", "minimize" if lower_is_better(str(metric)) else "maximize")
    if direction not in ("maximize", "minimize"):
        problems.append(_err(path, lines, ("objective", "direction"), "direction must be maximize or minimize"))
    space = _space(path, lines, data.get("space") or {}, problems) if kind == "tune" else ()
    if kind == "tune" and not space:
        problems.append(_err(path, lines, ("space",), "a tune study needs a non-empty space"))
    n_trials = data.get("n_trials", 20)
    if not isinstance(n_trials, int) or n_trials < 1:
        problems.append(_err(path, lines, ("n_trials",), "n_trials must be a positive integer"))
    sampler = _named_section(path, lines, data, "sampler", SAMPLERS, problems)
    pruner = _named_section(path, lines, data, "pruner", PRUNERS, problems)
    if problems:
        raise ConfigError("invalid study file:\n  " + "\n  ".join(problems))
    return Study(path=path, name=str(data.get("name") or path.stem), kind=kind, experiment=str(
        data.get("experiment") or (base_cfg.experiment if base_cfg else "")), base=dict(base),
        configurations=tuple(configs), labels=tuple(labels), promote=dict(promote), objective_metric=metric,
        direction=direction, n_trials=n_trials, sampler=sampler, pruner=pruner, space=space)


def with_execution(study: Study, **fields: Any) -> Study:
    """The study with execution fields (e.g. compile) set on its base and every configuration."""
    if bad := set(fields) - set(EXECUTION_FIELDS):
        raise ConfigError(f"not execution fields: {sorted(bad)}; allowed: {', '.join(EXECUTION_FIELDS)}")
    configs = tuple(resolve(TrainConfig, fields, base=c, source="command line") for c in study.configurations)
    return dataclasses.replace(study, base={**study.base, **fields}, configurations=configs)
