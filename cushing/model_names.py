"""The model names (the `model` parameter's contract) and which backbones train frozen by default.

The bottom layer, beside `cushing.config`: the typed configuration checks a run's model name against this list
without importing the model package, and the one backbone registry (`cushing.model.backbones`) holds one spec per
name here; `tests/test_backbones.py` checks that the two agree. Imports nothing."""
from __future__ import annotations

__all__ = ["MODEL_NAMES", "FROZEN_BY_DEFAULT", "resolve_freeze"]

MODEL_NAMES: tuple[str, ...] = (
    "densenet121", "densenet161", "densenet169", "densenet201",
    "resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
    "vit_b_16", "vit_b_32", "vit_l_16", "vit_l_32",
    "swin_t", "swin_s", "swin_b", "swin_l",
    "dinov2_s", "dinov2_b", "dinov2_l",
)
# Frozen is the paper's better DINOv2 setting (Table II), hence the default; the others are fine-tuned.
FROZEN_BY_DEFAULT: frozenset[str] = frozenset({"dinov2_s", "dinov2_b", "dinov2_l"})


def resolve_freeze(name: str, freeze: bool | None) -> bool:
    """The freeze setting a run uses: the given one, else the registry's policy for the backbone."""
    if freeze is not None:
        return bool(freeze)
    if name not in MODEL_NAMES:
        raise ValueError(f"unknown model {name!r}; choose one of: {' '.join(MODEL_NAMES)}")
    return name in FROZEN_BY_DEFAULT
