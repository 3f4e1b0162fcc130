"""Face extraction as in the paper (work in progress)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

SETTINGS_FILE = "faces_settings.json"


def settings_for_manifest(manifest: str | Path) -> dict[str, Any] | None:
    """The face-stage settings a face-crop manifest was produced with (its sidecar), else None."""
    side = Path(manifest).parent / SETTINGS_FILE
    return json.loads(side.read_text()) if side.exists() else None
