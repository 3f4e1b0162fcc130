"""The logged and served model: an MLflow pyfunc that takes raw photos and returns a screening decision.

Input: a DataFrame with a string column `image` (base64-encoded JPEG/PNG bytes).
Output, one row per photo: `probability` (of Cushing's), `label` (1/0 at the threshold chosen on validation and
stored with the model), `face_status`: `ok` (`not_applied` without a face stage), or why the photo was not scored
(`not_base64`, `too_large`, a decoder or face-stage reason code; then probability null, label -1), and
`operating_point` (the threshold, its rule and what that rule guarantees on validation). Only a request wrong as a
whole is refused (PayloadError: HTTP 400).
Weights are safetensors (no pickle); the model is logged as code (`model_code.py`), so loading it unpickles
nothing and works with MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false.
"""
from __future__ import annotations

import base64
import binascii
import json
import logging
import math
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from cushing.model.backbones import build_model, Preprocess
from cushing.model.augment import DeviceAugment
from cushing.devices import serving_device
from cushing.faces.extractor import FaceExtractor
from cushing.faces.settings import FaceSettings
from cushing.data.bank import letterbox
from cushing.data.imageio import BadImage, open_rgb
from mlflow.exceptions import MlflowException

__all__ = ["CushingModel", "MODEL_CONFIG", "MAX_IMAGE_B64", "PayloadError", "save_model_artifacts", "signature",
           "model_description"]

MODEL_CONFIG = "cushing_model.json"
WEIGHTS = "weights.safetensors"
MAX_IMAGE_B64 = 20 * 1024 * 1024  # characters of base64 per image (about 15 MB of photo)
MAX_ROWS = 256


class PayloadError(MlflowException):
    """A request wrong as a whole (no `image` column, no rows, too many rows): the scoring server answers HTTP 400
    with the reason as the error's message. A bad photo is not one: its row is answered with a status.

    The server rewrites an MlflowException's message to begin with the submitted frame ("Failed to predict data
    '<data>'"), which would echo the start of a patient's photo: this error's JSON is its own reason only."""

    def __init__(self, reason: str):
        from mlflow.protos.databricks_pb2 import BAD_REQUEST

        super().__init__(reason, error_code=BAD_REQUEST)
        self.reason = reason

    def serialize_as_json(self) -> str:
        return json.dumps({"error_code": self.error_code, "message": self.reason})


def signature():
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    # outputs only: with an input schema MLflow drops unknown columns before `predict` sees them, and a request
    # with `photo` instead of `image` could not be told what it sent
    return ModelSignature(outputs=Schema([ColSpec("double", "probability"), ColSpec("long", "label"),
                                          ColSpec("string", "face_status"), ColSpec("string", "operating_point")]))


def model_description(cfg: dict[str, Any]) -> str:
    faces = cfg.get("faces")
    how = (f"applies the face stage it was trained with (dlib + {faces.get('mask_method')} mask) to each photo"
           if faces else "expects face crops like its training images (no face extraction is applied)")
    warning = ("TRAINED ON SYNTHETIC DATA (the procedurally drawn demo cohort, not patients): for trying the "
               "service only, never for real photos. " if cfg.get("synthetic_data") else "")
    return (f"{warning}Cushing's syndrome screening model ({cfg['model']}"
            f"{', frozen backbone' if cfg.get('frozen') else ''}). "
            f"Input: column `image`, base64 JPEG/PNG. It {how}. Output: probability, label at threshold "
            f"{cfg['threshold']:.4f} (chosen on validation by rule {cfg.get('threshold_rule')!r}), face_status, "
            f"operating_point. {_operating_point(cfg)}. A screening aid, not a diagnosis.")


def _operating_point(cfg: dict[str, Any]) -> str:
    g = cfg.get("threshold_guarantee")
    return f"threshold {cfg['threshold']:.4f}, rule {cfg.get('threshold_rule')}" + (f": {g}" if g else "")


def save_model_artifacts(folder: Path, *, model, cfg: dict[str, Any]) -> dict[str, str]:
    """Weights as safetensors plus the JSON config the pyfunc needs; returns MLflow's artifacts mapping."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}, str(folder / WEIGHTS))
    (folder / MODEL_CONFIG).write_text(json.dumps(cfg, indent=1, default=str))
    return {"weights": str(folder / WEIGHTS), "config": str(folder / MODEL_CONFIG)}


def _decode_payload(value: Any) -> bytes | str:
    """The photo's bytes, or the status of a row that holds none."""
    if not isinstance(value, str):
        return "not_base64"
    if len(value) > MAX_IMAGE_B64:
        return "too_large"
    if value.startswith("data:") and "," in value[:100]:
        value = value.split(",", 1)[1]
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        return "not_base64"


def _request_frame(model_input: Any) -> pd.DataFrame:
    """The request as a table of photos, or PayloadError naming what is wrong with it as a whole."""
    try:
        df = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
    except ValueError:  # e.g. a dict of single values
        raise PayloadError("expected a table with a column named 'image', one row per photo") from None
    if len(df) == 0:
        raise PayloadError("no rows to score")
    if "image" not in df.columns:
        got = [str(c)[:40] for c in df.columns]
        raise PayloadError(f"expected a column named 'image' (base64 photo); got columns {got}")
    if len(df) > MAX_ROWS:
        raise PayloadError(f"{len(df)} rows in one request; at most {MAX_ROWS}")
    return df


class CushingModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        from safetensors.torch import load_file

        self.cfg = c = json.loads(Path(context.artifacts["config"]).read_text())
        if c.get("synthetic_data"):
            logging.getLogger("cushing.serve").warning(
                "this model was TRAINED ON SYNTHETIC DATA (the demo cohort, data digest %s): its outputs on real "
                "photos mean nothing; use it only to try the service", str(c.get("data_digest", ""))[:12])
        model = build_model(c["model"], pretrained=False, img_size=int(c["img_size"]), freeze=False)
        model.load_state_dict(load_file(context.artifacts["weights"]))
        self.device = serving_device()
        self.model = model.eval().to(self.device)
        # the training engine's own normalisation (uint8 -> float, mean/std), not a re-implementation of it
        self.normalize = DeviceAugment(Preprocess.from_model_config(c), self.device, strength=0.0).normalize
        self.faces = FaceExtractor(FaceSettings.from_dict(c["faces"])) if c.get("faces") else None

    def _prepare(self, raw: bytes | str) -> tuple[np.ndarray | None, str]:
        """The model's input for one photo, or None and the status that says why there is none."""
        from PIL import Image

        if isinstance(raw, str):
            return None, raw
        size = int(self.cfg["img_size"])
        try:  # decode as training did: reduced-scale JPEG decoding only down to what the next step needs
            rgb = open_rgb(raw, draft=1600 if self.faces is not None else 2 * size)
        except BadImage as e:
            return None, e.reason
        status = "not_applied"
        if self.faces is not None:
            result = self.faces.extract(rgb)
            if result.crop is None:
                return None, result.status
            rgb, status = result.crop, "ok"
        img = letterbox(Image.fromarray(rgb), size, self.cfg.get("interpolation", "bicubic"))
        return np.asarray(img).transpose(2, 0, 1), status

    def predict(self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        """One row per photo; a photo that cannot be scored gets its status, probability null and label -1."""
        import torch

        df = _request_frame(model_input)
        arrays, statuses = zip(*(self._prepare(_decode_payload(v)) for v in df["image"].tolist()))
        ok = [i for i, a in enumerate(arrays) if a is not None]
        prob = np.full(len(df), math.nan)
        if ok:
            x = torch.from_numpy(np.stack([arrays[i] for i in ok])).to(self.device)
            with torch.no_grad():
                logits = self.model(self.normalize(x)).float()
            z = (logits[:, 1] - logits[:, 0]).cpu().numpy() / float(self.cfg.get("temperature", 1.0))
            prob[ok] = 1.0 / (1.0 + np.exp(-z))
        label = np.where(np.isnan(prob), -1, (prob >= float(self.cfg["threshold"])).astype(int))
        # not scored: probability None (JSON null; NaN would make the served response invalid JSON)
        probability = pd.Series([float(v) if math.isfinite(v) else None for v in prob], dtype=object)
        return pd.DataFrame({"probability": probability, "label": label.astype(np.int64),
                             "face_status": list(statuses), "operating_point": _operating_point(self.cfg)})
