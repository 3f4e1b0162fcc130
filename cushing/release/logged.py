"""The logged model: an MLflow pyfunc (models from code, safetensors weights, the package in code_paths) with
its configuration, metadata, params and provenance; and loading it back (as the pyfunc, or as a torch model)."""
from __future__ import annotations

import shutil
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from cushing.data.demo import synthetic_jpeg_b64
from cushing.model.backbones import build_model
from cushing.release import pyfunc
from cushing.release.pyfunc import MODEL_CONFIG, WEIGHTS
from cushing.tracking import configure
from cushing.phases import phase

__all__ = ["log_model", "model_config", "pip_requirements", "load_model", "load_torch_model", "source_run",
           "LoggedModel"]


def pip_requirements() -> list[str]:
    """The project's pinned requirements for a logged model's environment: from pyproject.toml beside the package
    (a checkout; the package is run from its clone, not installed), else from the installed distribution."""
    pyproject = Path(__file__).resolve().parents[2] / "pyproject.toml"
    if pyproject.exists() and sys.version_info >= (3, 11):
        import tomllib

        return list(tomllib.loads(pyproject.read_text())["project"]["dependencies"])
    try:
        reqs = [r for r in (metadata.requires("cushing") or []) if "extra ==" not in r]
    except metadata.PackageNotFoundError:
        reqs = []
    return reqs or ["torch", "timm", "mlflow", "safetensors", "pillow", "pandas", "numpy"]


@dataclass(frozen=True)
class LoggedModel:
    uri: str  # models:/m-...
    model_id: str  # MLflow 3's logged-model id: metrics logged with it show on the model's pages


def model_config(outcome, *, faces: dict[str, Any] | None, data_digest: str, synthetic: bool) -> dict[str, Any]:
    """What the pyfunc needs to rebuild and apply the model, and what the registry records about it."""
    cfg, pre = outcome.config, outcome.preprocess
    return {"model": cfg.model, "timm_id": outcome.spec.timm_id, "frozen": outcome.frozen, "img_size": cfg.img_size,
            "mean": list(pre.mean), "std": list(pre.std), "interpolation": pre.interpolation,
            "threshold": float(outcome.threshold), "threshold_rule": cfg.threshold,
            "threshold_guarantee": outcome.operating.statement if outcome.operating else "",
            "temperature": float(outcome.temperature), "faces": faces, "data_digest": data_digest,
            "synthetic_data": bool(synthetic), "best_epoch": outcome.fit.best_epoch}


def _model_params(cfg: dict[str, Any]) -> dict[str, str]:
    """Shown on the logged-model page beside its metrics."""
    keys = ("model", "frozen", "img_size", "threshold", "threshold_rule", "threshold_guarantee", "temperature",
            "best_epoch", "synthetic_data", "data_digest")  # `threshold` as operating_threshold: the run's is the rule
    return {"operating_threshold" if k == "threshold" else k: str(cfg[k]).lower() if isinstance(cfg[k], bool)
            else str(cfg[k]) for k in keys}


@contextmanager
def _logging_model():
    """Should MLflow load the model while logging it (an input-example check), its INFO lines and the load-time
    synthetic-data warning (meant for servers) stay out of the training run's console."""
    import logging

    levels = {log: log.level for log in map(logging.getLogger, ("mlflow.pyfunc", "cushing.serve"))}
    for log in levels:
        log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for log, level in levels.items():
            log.setLevel(level)


def log_model(outcome, *, faces: dict[str, Any] | None, data_digest: str, synthetic: bool,
              name: str = "model", run_id: str | None = None) -> LoggedModel:
    """Log the trained model as a models-from-code pyfunc in run `run_id` (default: the active run), before its
    final metrics (which are then linked to it)."""
    import pandas as pd
    from mlflow.models import Model

    cfg = model_config(outcome, faces=faces, data_digest=data_digest, synthetic=synthetic)
    package = Path(__file__).resolve().parent.parent
    with tempfile.TemporaryDirectory(prefix="cushing-model-") as d, _logging_model():
        with phase("model: weights and code"):
            artifacts = pyfunc.save_model_artifacts(Path(d) / "artifacts", model=outcome.model, cfg=cfg)
            code = Path(d) / "code" / "cushing"  # the package travels with the model, without bytecode caches
            shutil.copytree(package, code, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
            example = pd.DataFrame({"image": [synthetic_jpeg_b64(seed=7)]})
        with phase("model: MLflow log_model"):
            info = Model.log(
                artifact_path=None, name=name, run_id=run_id,  # MLflow 3: `name` names the logged model
                flavor=_Pyfunc, flavor_name="pyfunc.ModelFromCode",  # what mlflow.pyfunc.log_model records for it
                validate_serving_input=False, python_model=str(Path(__file__).with_name("model_code.py")),
                artifacts=artifacts, code_paths=[str(code)], signature=pyfunc.signature(), input_example=example,
                pip_requirements=pip_requirements(), params=_model_params(cfg),
                metadata={"cushing": {k: v for k, v in cfg.items() if k != "faces"}, "description":
                          pyfunc.model_description(cfg), "synthetic_data": cfg["synthetic_data"]},
                tags={"model": cfg["model"], "freeze": str(cfg["frozen"]).lower(),
                      "synthetic_data": str(cfg["synthetic_data"]).lower(), "data_digest": data_digest})
    return LoggedModel(info.model_uri, info.model_id)


class _Pyfunc:
    """mlflow.pyfunc as `Model.log`'s flavor (what `mlflow.pyfunc.log_model` passes), with
    `validate_serving_input=False`, which pyfunc's log_model does not pass on: that check reloads the model and
    scores the input example (a second or more per run; a failure is only a warning). The input example is still
    saved; the tests load and serve logged models, old releases' too."""

    @staticmethod
    def save_model(path, mlflow_model=None, validate_serving_input: bool = True, **kwargs):
        import mlflow

        return mlflow.pyfunc.save_model(path, mlflow_model=mlflow_model, **kwargs)


def load_torch_model(uri: str):
    """(torch model in eval mode, its cushing_model.json) from a logged/registered model, weights-only."""
    import json

    import mlflow
    from safetensors.torch import load_file

    configure()
    local = Path(mlflow.artifacts.download_artifacts(uri))
    cfg_path = next(local.rglob(MODEL_CONFIG), None)
    weights = next(local.rglob(WEIGHTS), None)
    if cfg_path is None or weights is None:
        raise FileNotFoundError(f"{uri} is not a cushing model (no {MODEL_CONFIG} / {WEIGHTS} in its artifacts)")
    cfg = json.loads(cfg_path.read_text())
    model = build_model(cfg["model"], pretrained=False, img_size=int(cfg["img_size"]), freeze=False)
    model.load_state_dict(load_file(str(weights)))
    return model.eval(), cfg


def source_run(uri: str) -> str | None:
    """The run that logged the model at `uri` (a logged model, or a registered version of one)."""
    import mlflow

    configure()
    return mlflow.models.get_model_info(uri).run_id


def load_model(uri: str):
    import mlflow

    configure()
    return mlflow.pyfunc.load_model(uri)
