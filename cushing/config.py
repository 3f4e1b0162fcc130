"""Typed configuration, declared once.

Defaults live in frozen dataclasses. Overrides come from the CLI, MLproject parameters (all strings) or study
files (YAML); unknown or mistyped keys are errors that name the key (and the YAML line when there is one).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import types
import typing
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Mapping
from cushing.stats.thresholds import parse_threshold_rule
from cushing.model_names import MODEL_NAMES, resolve_freeze

__all__ = ["TrainConfig", "ConfigError", "resolve", "to_params", "parse_bool", "parse_ratios", "EXECUTION_FIELDS",
           "run_name", "config_digest", "load_yaml_with_lines", "cache_home", "COMPILE_MODES", "parse_audit_threshold"]


COMPILE_MODES = ("none", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


class ConfigError(ValueError):
    """A configuration value or key is wrong; the message names it (and where it came from)."""


@dataclass(frozen=True)
class TrainConfig:
    """One training run. Defaults are the paper's protocol (Song et al.) where the paper states one."""

    model: str = "vit_b_32"
    freeze: bool | None = None  # None: the registry's policy (DINOv2 frozen, others fine-tuned)
    data: str = "demo"  # "demo" or a manifest CSV
    epochs: int = 200
    batch_size: int = 32
    lr: float = 1e-3  # the paper does not state its learning rate; 1e-3 is our choice (README)
    momentum: float = 0.9
    weight_decay: float = 0.0
    seed: int = 0
    split_seed: int = 0  # kept apart from `seed` so repeated seeds train on the same split
    split_ratios: str = "1:1:1"
    pretrained: bool = True
    weights: str | None = None
    img_size: int = 224
    oversample: int = 5  # each training positive appears this many times per epoch, as augmented views
    aug_strength: float = 1.0  # scales rotation, crop and brightness ranges; 0 disables augmentation
    aug_views: int = 8  # frozen backbones: cached augmented views per training image
    device: str = "auto"
    select_metric: str = "val/f1"  # chooses the best epoch; validation only
    threshold: str = "f1"  # f1 | youden | sensitivity:0.9 | a number; chosen on validation
    calibrate: bool = False  # temperature scaling fitted on validation
    prevalence: float | None = None  # screening prevalence for PPV/NPV; None = training prevalence
    min_positives: int = 5  # subgroups with fewer positives are not estimable; each split needs this many patients
    allow_few_positives: bool = False  # train although a split has fewer than min_positives patients
    allow_one_class_subgroups: bool = False  # train although a sex or subgroup of val or test lacks a class
    skip_bad_photos: bool = False  # leave out photos that cannot be found or read (counted) instead of stopping
    bootstrap: int = 2000  # bootstrap resamples for F1/AUC intervals (0 = off)
    cv_folds: int = 0  # >1: stratified group k-fold, one child run per fold
    seeds: int = 1  # >1: repeat with seeds seed..seed+N-1, one child run per seed
    cam: bool = True
    allow_phi_artifacts: bool = False  # per-image overlays, crops, file names: off unless explicitly allowed
    experiment: str = ""  # "": the one `mlflow run` made its run in, else MLFLOW_EXPERIMENT_NAME, else cushing
    run_name: str | None = None
    memory_budget_gb: float = 4.0  # decoded uint8 images above this stream from host memory
    patience: int = 0  # stop after this many epochs without improvement (0 = never; the paper trains 200)
    log_model: bool = True
    decode_workers: int = 0  # 0 = one per CPU core
    compile: str = "none"  # torch.compile mode for fine-tuning: none | default | reduce-overhead | max-autotune
    subgroups: str = "sex"  # manifest columns reported like sex (metrics, intervals, gaps), comma-separated
    split_strata: str = "label,sex"  # columns the drawn split is stratified on (label is always one of them)
    audit: str = "warn"  # off | warn (keep merged and suspected pairs in one split) | strict (refuse merged pairs)
    # same-person distance: auto = the loosest at which the shipped curve expects <= 0.2 false pairs per photo in
    # this cohort (its sex mix), mutual nearest neighbours only, lowered until no merged group holds > 5% of photos
    audit_threshold: str = "auto"  # same-person distance: auto (0.2 expected false pairs/photo, guarded) or a number
    audit_decisions: str | None = None  # a reviewed audit.csv (verdict same/different): honoured when merging
    audit_curve: str | None = None  # a same-person curve from `cushing audit --evaluate` (default: the shipped one)
    checkpoint_every: int = 1  # consider a resumable checkpoint every N epochs (0 = never) ...
    checkpoint_minutes: float = 5.0  # ... and write one once this much wall time passed since the last (0 = each)
    log_checkpoint: bool = False  # also log the checkpoint as a run artifact (to resume on another host)
    resume: str | None = None  # a run id to continue from its last checkpoint, or "true": see README, Reliability

    def __post_init__(self) -> None:
        _validate_train(self)

    @property
    def ratios(self) -> tuple[float, float, float]:
        return parse_ratios(self.split_ratios)

    @property
    def subgroup_columns(self) -> tuple[str, ...]:
        return _columns(self.subgroups)

    @property
    def strata_columns(self) -> tuple[str, ...]:
        cols = _columns(self.split_strata)
        return cols if "label" in cols else ("label", *cols)

    @property
    def frozen(self) -> bool:
        return resolve_freeze(self.model, self.freeze)


def _columns(text: str) -> tuple[str, ...]:
    return tuple(dict.fromkeys(c.strip() for c in str(text).split(",") if c.strip()))


# What shapes a cohort (its photos, split and subgroups): configurations equal on these share one decoded cohort.
COHORT_FIELDS = ("data", "img_size", "split_ratios", "split_seed", "split_strata", "subgroups", "audit",
                 "audit_threshold", "audit_decisions", "audit_curve", "skip_bad_photos")

# How a run executes, not what it trains: changing these resumes the same study instead of starting a new one.
EXECUTION_FIELDS = ("run_name", "compile", "decode_workers", "memory_budget_gb", "checkpoint_every",
                    "checkpoint_minutes", "log_checkpoint", "resume")


def run_name(cfg: TrainConfig) -> str:
    """The run's name: the one given, else `<model>` or `<model>-frozen`."""
    return cfg.run_name or f"{cfg.model}{'-frozen' if cfg.frozen else ''}"


def config_digest(cfg: TrainConfig) -> str:
    """Identity of a configuration (resumable sweeps, resume=true): everything but how it executes."""
    d = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in EXECUTION_FIELDS}
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


def parse_ratios(text: str) -> tuple[float, float, float]:
    parts = str(text).replace(",", ":").split(":")
    try:
        vals = tuple(float(p) for p in parts)
    except ValueError:
        raise ConfigError(f"split_ratios: expected three numbers like 1:1:1, got {text!r}") from None
    if len(vals) != 3 or any(v < 0 or not math.isfinite(v) for v in vals) or vals[0] <= 0 or sum(vals) <= 0:
        raise ConfigError(f"split_ratios: expected train:val:test with train > 0, got {text!r}")
    return vals  # type: ignore[return-value]


def _validate_train(c: TrainConfig) -> None:
    problems = [] if c.model in MODEL_NAMES else [f"model: unknown {c.model!r}; choose one of: {' '.join(MODEL_NAMES)}"]
    lows = {"epochs": 1, "batch_size": 1, "img_size": 1, "oversample": 1, "aug_views": 1, "bootstrap": 0,
            "checkpoint_every": 0}
    problems += [f"{n}: must be >= {low}, got {getattr(c, n)}" for n, low in lows.items() if getattr(c, n) < low]
    refusals = (  # (the value is wrong, what to say)
        (not (math.isfinite(c.checkpoint_minutes) and c.checkpoint_minutes >= 0),
         f"checkpoint_minutes: must be >= 0, got {c.checkpoint_minutes}"),
        (c.resume is not None and c.resume != "true" and not (len(c.resume) == 32 and c.resume.isalnum()),
         f"resume: a run id (32 characters) or true, got {c.resume!r}"),
        (c.lr <= 0, f"lr: must be > 0, got {c.lr}"),
        (not 0 <= c.momentum < 1, f"momentum: must be in [0, 1), got {c.momentum}"),
        (c.weight_decay < 0, f"weight_decay: must be >= 0, got {c.weight_decay}"),
        (c.aug_strength < 0, f"aug_strength: must be >= 0, got {c.aug_strength}"),
        (c.prevalence is not None and not 0 < c.prevalence < 1, f"prevalence: must be in (0, 1), got {c.prevalence}"),
        (c.cv_folds == 1 or c.cv_folds < 0, f"cv_folds: 0 (off) or >= 2, got {c.cv_folds}"),
        (c.seeds < 1, f"seeds: must be >= 1, got {c.seeds}"),
        (c.device not in ("auto", "cpu", "cuda", "mps") and not c.device.startswith("cuda:"),
         f"device: auto, cpu, cuda, cuda:N or mps, got {c.device!r}"),
        (c.compile not in COMPILE_MODES, f"compile: one of {' | '.join(COMPILE_MODES)}, got {c.compile!r}"),
        (c.audit not in ("off", "warn", "strict"), f"audit: off, warn or strict, got {c.audit!r}"),
    )
    problems += [message for wrong, message in refusals if wrong]
    problems += _refusal(parse_audit_threshold, c.audit_threshold)
    if not _columns(c.subgroups):
        problems.append("subgroups: at least one manifest column (default sex)")
    if not c.select_metric.startswith("val/"):
        problems.append(f"select_metric: must be a validation metric (val/...), got {c.select_metric!r}")
    problems += _refusal(parse_ratios, c.split_ratios) + _refusal(parse_threshold_rule, c.threshold, "threshold: ")
    if problems:
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(problems))


def _refusal(parse, value: Any, prefix: str = "") -> list[str]:
    """[the message of the ValueError that `parse(value)` raises], or [] when it parses."""
    try:
        parse(value)
    except ValueError as e:
        return [f"{prefix}{e}"]
    return []


_BOOL_WORDS = {**dict.fromkeys(("true", "1", "yes", "y", "on"), True),
               **dict.fromkeys(("false", "0", "no", "n", "off"), False)}


def parse_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if (text := str(value).strip().lower()) not in _BOOL_WORDS:
        raise ValueError(f"expected true/false, got {value!r}")
    return _BOOL_WORDS[text]


def parse_audit_threshold(value: str | float | None) -> float | None:
    """`auto` (or empty) -> None, the automatic threshold; else a positive distance."""
    try:
        t = _coerce(float | None, value)
    except ValueError:
        t = -1.0
    if t is not None and not 0 < t < 10:
        raise ValueError(f"audit_threshold: auto or a positive distance like 0.5, got {value!r}")
    return t


_NONE_WORDS = ("", "none", "null", "auto")


def _coerce(tp: Any, value: Any) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.strip().lower() in _NONE_WORDS):
            return None
        return _coerce(next(a for a in typing.get_args(tp) if a is not type(None)), value)
    if tp is bool:
        return parse_bool(value)
    if tp is int:
        try:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value) if isinstance(value, (int, float)) else int(str(value).strip())
        except ValueError:
            raise ValueError(f"expected an integer, got {value!r}") from None
    if tp is float:
        try:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        except (TypeError, ValueError):
            raise ValueError(f"expected a number, got {value!r}") from None
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ValueError(f"expected a string, got {type(value).__name__}")
        return str(value)
    return value


def resolve(cls: type, overrides: Mapping[str, Any] | None = None, *, base: Any = None,
            lines: Mapping[str, int] | None = None, source: str = "") -> Any:
    """A frozen `cls` from `base` (or the defaults) with `overrides` applied, every key checked and coerced."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in fields(cls)}
    values = dataclasses.asdict(base) if base is not None else {}
    problems = []
    for key, raw in (overrides or {}).items():
        where = _where(source, lines, key)
        if key not in names:
            close = [n for n in names if n.replace("_", "") == str(key).replace("_", "").replace("-", "")]
            problems.append(f"{where}unknown key {key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
            continue
        try:
            values[key] = _coerce(hints[key], raw)
        except ValueError as e:
            problems.append(f"{where}{key}: {e}")
    if problems:
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(problems))
    try:
        return cls(**values)
    except ConfigError as e:
        if source:
            raise ConfigError(f"{source}: {e}") from None
        raise


def _where(source: str, lines: Mapping[str, int] | None, key: str) -> str:
    return f"{source}:{lines[key]}: " if lines and key in lines else f"{source}: " if source else ""


def to_params(cfg: Any) -> dict[str, str]:
    """Flat string params for MLflow (None -> 'auto' for freeze, '' otherwise)."""
    def text(name: str, v: Any) -> str:
        return ("auto" if name == "freeze" else "") if v is None else str(v).lower() if isinstance(v, bool) else str(v)
    return {f.name: text(f.name, getattr(cfg, f.name)) for f in fields(cfg)}


def load_yaml_with_lines(path: str | Path) -> tuple[Any, dict[tuple, int]]:
    """Parse YAML and record the line of every mapping key, by its path of keys/indexes."""
    import yaml

    text = Path(path).read_text()
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    lines: dict[tuple, int] = {}

    def walk(n, prefix: tuple) -> None:
        if isinstance(n, yaml.MappingNode):
            for k, v in n.value:
                key = prefix + (k.value,)
                lines[key] = k.start_mark.line + 1
                walk(v, key)
        elif isinstance(n, yaml.SequenceNode):
            for i, v in enumerate(n.value):
                lines[prefix + (i,)] = v.start_mark.line + 1
                walk(v, prefix + (i,))
    if node is not None:
        walk(node, ())
    return yaml.safe_load(text), lines


def lines_under(lines: Mapping[tuple, int], prefix: tuple) -> dict[str, int]:
    """Key -> line for the mapping at `prefix`."""
    n = len(prefix)
    return {k[n]: v for k, v in lines.items() if len(k) == n + 1 and k[:n] == prefix and isinstance(k[n], str)}


def cache_home() -> Path:
    """Where demo data and caches live: CUSHING_HOME, else ~/.cache/cushing."""
    return Path(os.environ.get("CUSHING_HOME", Path.home() / ".cache" / "cushing")).expanduser()

