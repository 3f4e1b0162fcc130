"""dlib's model files, where `face-recognition-models` ships them, and content hashes of weights files: what the
face stage and the cohort audit key their caches on."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from cushing.data.manifest import sha256_file

__all__ = ["models_dir", "landmark_model_path", "file_hash"]


def models_dir() -> Path:
    """face-recognition-models ships dlib's .dat files; found by path (its import needs pkg_resources)."""
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("dlib's landmark models come from `face-recognition-models` (pip install "
                          "face-recognition-models==0.3.0)")
    return Path(list(spec.submodule_search_locations)[0]) / "models"


def landmark_model_path() -> Path:
    return models_dir() / "shape_predictor_68_face_landmarks.dat"


def file_hash(path: Path, memo: Path | None) -> str:
    """sha256 of a weights file, memoised by (path, size, mtime) so a 2.5 GB SAM file is read once."""
    st = path.stat()
    key = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    table = json.loads(memo.read_text()) if memo and memo.exists() else {}
    if key not in table:
        table[key] = sha256_file(path, chunk=1 << 22)
        if memo:
            memo.parent.mkdir(parents=True, exist_ok=True)
            memo.write_text(json.dumps(table))
    return table[key]
