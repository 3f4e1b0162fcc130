"""The logged and served model: an MLflow pyfunc that takes raw photos and returns a screening decision.

Input: a DataFrame with a string column `image` (base64-encoded JPEG/PNG bytes).
Output: `probability` (of Cushing's; null when there is no usable face), `label` (1/0 at the threshold chosen on
validation and stored with the model; -1 when no usable face), `face_status` and `operating_point` (the threshold,
its rule and what that rule guarantees on validation).
Weights are safetensors (no pickle); the model is logged as code (`model_code.py`), so loading it unpickles
nothing and works with MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false.
"""
from __future__ import annotations

import base64
import binascii
import json
import logging
import math
import os
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

__all__ = ["CushingModel", "MODEL_CONFIG", "MAX_IMAGE_B64", "PayloadError", "save_model_artifacts", "signature",
           "model_description"]

MODEL_CONFIG = "cushing_model.json"
WEIGHTS = "weights.safetensors"
MAX_IMAGE_B64 = 20 * 1024 * 1024  # characters of base64 per image (about 15 MB of photo)
MAX_ROWS = 256


class PayloadError(ValueError):
    """A request the model cannot score; the scoring server answers 400 with this message as the error's last line.

    Deliberately not an MlflowException: MLflow's scoring server prefixes those with the whole submitted frame
    ("Failed to predict data '<data>'"), which would echo the first characters of the patient's photo."""


def signature():
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    return ModelSignature(
        # optional for MLflow's schema check (its error for a missing column also echoes the request): ours says so
        inputs=Schema([ColSpec("string", "image", required=False)]),
        outputs=Schema([ColSpec("double", "probability"), ColSpec("long", "label"), ColSpec("string", "face_status"),
                               ColSpec("string", "operating_point")]),
    )


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
            f"operating_point. {_operating_point(cfg)}. "
            f"A screening aid, not a diagnosis.")


def _operating_point(cfg: dict[str, Any]) -> str:
    g = cfg.get("threshold_guarantee")
    return f"threshold {cfg['threshold']:.4f}, rule {cfg.get('threshold_rule')}" + (f": {g}" if g else "")


def save_model_artifacts(folder: Path, *, model, cfg: dict[str, Any]) -> dict[str, str]:
    """Weights as safetensors plus the JSON config the pyfunc needs; returns MLflow's artifacts mapping."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(folder / WEIGHTS))
    (folder / MODEL_CONFIG).write_text(json.dumps(cfg, indent=1, default=str))
    return {"weights": str(folder / WEIGHTS), "config": str(folder / MODEL_CONFIG)}


def _decode_payload(value: Any, row: int) -> bytes:
    if not isinstance(value, str):
        raise PayloadError(f"row {row}: `image` must be a base64 string, got {type(value).__name__}")
    if not value:
        raise PayloadError(f"row {row}: `image` is empty")
    if len(value) > MAX_IMAGE_B64:
        raise PayloadError(f"row {row}: image is too large ({len(value):,} base64 characters > {MAX_IMAGE_B64:,})")
    if value.startswith("data:") and "," in value[:100]:
        value = value.split(",", 1)[1]
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise PayloadError(f"row {row}: `image` is not valid base64") from None


class CushingModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        from safetensors.torch import load_file

        self.cfg = json.loads(Path(context.artifacts["config"]).read_text())
        c = self.cfg
        if c.get("synthetic_data") and not os.environ.get("CUSHING_LOGGING_MODEL"):
            logging.getLogger("cushing.serve").warning(
                "this model was TRAINED ON SYNTHETIC DATA (the demo cohort, data digest %s): its outputs on real "
                "photos mean nothing; use it only to try the service", str(c.get("data_digest", ""))[:12])
        model = build_model(c["model"], pretrained=False, img_size=int(c["img_size"]), freeze=False)
        model.load_state_dict(load_file(context.artifacts["weights"]))
        self.device = serving_device()
        self.model = model.eval().to(self.device)
        # the training engine's own normalisation (uint8 -> float, mean/std), not a re-implementation of it
        self.normalize = DeviceAugment(Preprocess.from_model_config(c), self.device, strength=0.0).normalize
        self.faces = None
        if c.get("faces"):
            self.faces = FaceExtractor(FaceSettings.from_dict(c["faces"]))

    def _prepare(self, raw: bytes, row: int) -> tuple[np.ndarray | None, str]:
        from PIL import Image


        size = int(self.cfg["img_size"])
        try:  # decode as training did: reduced-scale JPEG decoding only down to what the next step needs
            rgb = open_rgb(raw, draft=1600 if self.faces is not None else 2 * size)
        except BadImage as e:
            raise PayloadError(f"row {row}: {e.reason}: {e.detail or 'not a usable image'}") from None
        status = "not_applied"
        if self.faces is not None:
            result = self.faces.extract(rgb)
            if result.crop is None:
                return None, result.status
            rgb, status = result.crop, "ok"
        img = letterbox(Image.fromarray(rgb), size, self.cfg.get("interpolation", "bicubic"))
        return np.asarray(img).transpose(2, 0, 1), status

    def predict(self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        import torch

        df = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        if "image" not in df.columns:
            raise PayloadError(f"expected a column named 'image' (base64 photo); got columns {list(df.columns)}")
        if len(df) == 0:
            raise PayloadError("no rows to score")
        if len(df) > MAX_ROWS:
            raise PayloadError(f"{len(df)} rows in one request; at most {MAX_ROWS}")
        arrays, statuses = [], []
        for i, value in enumerate(df["image"].tolist()):
            arr, status = self._prepare(_decode_payload(value, i), i)
            arrays.append(arr)
            statuses.append(status)
        ok = [i for i, a in enumerate(arrays) if a is not None]
        prob = np.full(len(df), math.nan)
        if ok:
            x = torch.from_numpy(np.stack([arrays[i] for i in ok])).to(self.device)
            with torch.no_grad():
                logits = self.model(self.normalize(x)).float()
            z = (logits[:, 1] - logits[:, 0]).cpu().numpy() / float(self.cfg.get("temperature", 1.0))
            prob[ok] = 1.0 / (1.0 + np.exp(-z))
        thr = float(self.cfg["threshold"])
        label = np.where(np.isnan(prob), -1, (prob >= thr).astype(int))
        # no usable face: probability None (JSON null; NaN would make the served response invalid JSON)
        probability = pd.Series([float(v) if math.isfinite(v) else None for v in prob], dtype=object)
        return pd.DataFrame({"probability": probability, "label": label.astype(np.int64), "face_status": statuses,
                             "operating_point": _operating_point(self.cfg)})
