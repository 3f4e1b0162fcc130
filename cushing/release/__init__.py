"""Release. Owns: `logged` (logging and loading the model), `pyfunc` + `model_code` (the served model; models from
code, so these two keep their module paths for every model ever logged), `registry` (promotion, aliases, model cards)
and `card` (rendering a card; no mlflow). With `cushing.tracking` the only mlflow importer. May import
`cushing.model`, `cushing.faces`, `cushing.data`, `cushing.stats`, `cushing.tracking` and `cushing.config`."""
from __future__ import annotations

from cushing.release.logged import LoggedModel, load_model, load_torch_model, log_model, model_config, \
    pip_requirements, source_run
from cushing.release.registry import REGISTERED_MODEL, link_evaluation, model_version_of

__all__ = ["log_model", "model_config", "pip_requirements", "load_model", "load_torch_model", "REGISTERED_MODEL",
           "LoggedModel", "link_evaluation", "model_version_of", "source_run"]
