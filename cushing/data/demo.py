"""A synthetic demo cohort with exactly the paper's Table I counts, drawn procedurally.

The label changes face roundness (moon facies) and cheek redness (plethora); skin tone, hair, pose, lighting,
background and sex-typical features vary as nuisance. No real face: these are also the logged models' input examples.
"""
from __future__ import annotations

import base64
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw, ImageFilter

__all__ = ["TABLE_I", "make_demo_cohort", "draw_face", "FaceTraits", "synthetic_jpeg_b64"]

# (split, sex, label) -> subjects, from Song et al. Table I: 343 subjects, 49 patients.
TABLE_I: dict[tuple[str, str, int], int] = {
    ("train", "M", 0): 13, ("train", "M", 1): 3, ("train", "F", 0): 85, ("train", "F", 1): 14,
    ("val", "M", 0): 16, ("val", "M", 1): 4, ("val", "F", 0): 82, ("val", "F", 1): 12,
    ("test", "M", 0): 11, ("test", "M", 1): 4, ("test", "F", 0): 87, ("test", "F", 1): 12,
}

SKIN = np.array([[255, 224, 196], [241, 194, 167], [224, 172, 138], [198, 134, 97], [161, 102, 67], [110, 70, 45]])
HAIR = np.array([[30, 24, 20], [70, 45, 30], [120, 80, 45], [200, 160, 100], [150, 150, 150], [90, 30, 20]])


@dataclass(frozen=True)
class FaceTraits:
    label: int
    sex: str
    roundness: float  # face width / height
    redness: float  # cheek plethora alpha
    skin: tuple[int, int, int]
    hair: tuple[int, int, int]
    yaw: float  # -1..1, shifts features sideways
    roll: float  # degrees
    light: float  # -1..1, side lighting
    background: tuple[int, int, int]
    scale: float

    @staticmethod
    def draw(rng: np.random.Generator, label: int, sex: str) -> "FaceTraits":
        roundness = (0.74 if sex == "F" else 0.79) + (0.11 if label else 0.0) + rng.normal(0, 0.035)
        redness = float(np.clip((0.45 if label else 0.08) + rng.normal(0, 0.12), 0, 0.85))
        skin = SKIN[rng.integers(len(SKIN))] + rng.integers(-12, 13, 3)
        bg = rng.integers(150, 256, 3)
        return FaceTraits(
            label=label, sex=sex, roundness=float(roundness), redness=redness,
            skin=tuple(int(v) for v in np.clip(skin, 0, 255)),
            hair=tuple(int(v) for v in HAIR[rng.integers(len(HAIR))]),
            yaw=float(rng.uniform(-0.35, 0.35)), roll=float(rng.normal(0, 4)), light=float(rng.uniform(-1, 1)),
            background=tuple(int(v) for v in bg), scale=float(rng.uniform(0.9, 1.05)),
        )


def _mix(a, b, t: float) -> tuple[int, int, int]:
    return tuple(int(round(x * (1 - t) + y * t)) for x, y in zip(a, b))


def draw_face(t: FaceTraits, size: int = 224, seed: int = 0) -> Image.Image:
    """One frontal face; drawn at 2x and downsampled for smooth edges."""
    rng = np.random.default_rng(seed)
    S = size * 2
    img = Image.new("RGB", (S, S), t.background)
    d = ImageDraw.Draw(img, "RGBA")
    cx, cy = S * 0.5, S * 0.52
    h = S * 0.50 * t.scale
    w = h * t.roundness
    dx = t.yaw * w * 0.18
    # shoulders and neck
    d.ellipse([cx - S * 0.45, cy + h * 0.55, cx + S * 0.45, cy + h * 1.4], fill=_mix(t.background, (60, 60, 90), 0.7))
    d.rectangle([cx - w * 0.22, cy + h * 0.3, cx + w * 0.22, cy + h * 0.75], fill=_mix(t.skin, (0, 0, 0), 0.12))
    # hair behind the face: long for most female faces
    if t.sex == "F":
        d.ellipse([cx - w * 0.68, cy - h * 0.62, cx + w * 0.68, cy + h * 0.75], fill=t.hair)
    # face, with a wider jaw for male faces
    d.ellipse([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], fill=t.skin)
    if t.sex == "M":
        d.rectangle([cx - w * 0.42, cy, cx + w * 0.42, cy + h * 0.32], fill=t.skin)
        d.ellipse([cx - w * 0.42, cy + h * 0.12, cx + w * 0.42, cy + h * 0.5], fill=t.skin)
        stubble = _mix(t.skin, t.hair, 0.35) + (int(90 * rng.uniform(0.2, 1)),)
        d.ellipse([cx - w * 0.34 + dx, cy + h * 0.12, cx + w * 0.34 + dx, cy + h * 0.5], fill=stubble)
    # hair on top
    d.chord([cx - w * 0.55, cy - h * 0.62, cx + w * 0.55, cy - h * 0.02], 180, 360, fill=t.hair)
    # plethora: red cheeks
    red = (220, 40, 50, int(255 * t.redness))
    for side in (-1, 1):
        ccx = cx + dx + side * w * 0.27
        d.ellipse([ccx - w * 0.15, cy + h * 0.02, ccx + w * 0.15, cy + h * 0.24], fill=red)
    # eyes, brows, nose, mouth
    ey = cy - h * 0.06
    brow = int(S * (0.012 if t.sex == "F" else 0.02))
    for side in (-1, 1):
        ex = cx + dx + side * w * 0.2
        d.ellipse([ex - w * 0.085, ey - h * 0.035, ex + w * 0.085, ey + h * 0.035], fill=(250, 250, 250))
        d.ellipse([ex - w * 0.035, ey - h * 0.03, ex + w * 0.035, ey + h * 0.03], fill=(50, 35, 25))
        d.line([ex - w * 0.1, ey - h * 0.09, ex + w * 0.1, ey - h * 0.1], fill=_mix(t.hair, (0, 0, 0), 0.3), width=brow)
    nose = _mix(t.skin, (0, 0, 0), 0.25)
    d.line([cx + dx, ey + h * 0.02, cx + dx * 1.3 - w * 0.03, cy + h * 0.13], fill=nose, width=int(S * 0.008))
    lips = (170, 70, 80) if t.sex == "F" else _mix(t.skin, (120, 40, 40), 0.5)
    d.chord([cx + dx - w * 0.14, cy + h * 0.16, cx + dx + w * 0.14, cy + h * 0.28], 0, 180, fill=lips)
    arr = np.asarray(img.rotate(t.roll, resample=Image.BICUBIC, fillcolor=t.background), dtype=np.float32)
    side_light = 1 + np.linspace(-1, 1, S)[None, :, None] * t.light * 0.18
    img = Image.fromarray(np.clip(arr * side_light, 0, 255).astype(np.uint8))
    img = img.resize((size, size), Image.LANCZOS).filter(ImageFilter.GaussianBlur(0.6))
    arr = np.asarray(img, dtype=np.float32) + rng.normal(0, 4, (size, size, 3))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def make_demo_cohort(out: str | Path, *, seed: int = 0, size: int = 224) -> Path:
    """Write images/ and manifest.csv (Table I counts); returns the manifest path."""
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = []
    for (split, sex, label), n in TABLE_I.items():
        for _ in range(n):
            i = len(rows)
            traits = FaceTraits.draw(rng, label, sex)
            name = f"images/demo_{i:04d}.jpg"
            draw_face(traits, size=size, seed=seed * 100003 + i).save(out / name, quality=92)
            rows.append({"image": name, "label": label, "sex": sex, "subject_id": f"demo_{i:04d}", "split": split,
                         "synthetic": 1, "roundness": round(traits.roundness, 4), "redness": round(traits.redness, 4)})
    manifest = out / "manifest.csv"
    pd.DataFrame(rows).to_csv(manifest, index=False)
    (out / "SYNTHETIC.txt").write_text(
        "Synthetic demo cohort drawn by `cushing demo-data`: procedurally drawn faces, no real person.\n"
        "Counts follow Song et al. Table I (343 subjects, 49 patients). Label 1 = rounder face + red cheeks.\n")
    return manifest


def synthetic_jpeg_b64(seed: int = 0, size: int = 224) -> str:
    """A base64 JPEG of a synthetic face: the input example for logged models (never a real face)."""
    buf = io.BytesIO()
    draw_face(FaceTraits.draw(np.random.default_rng(seed), 1, "F"), size=size, seed=seed).save(buf, "JPEG", quality=90)
    return base64.b64encode(buf.getvalue()).decode()

