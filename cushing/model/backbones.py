"""The one backbone registry: paper model names -> timm models, freeze policy, Grad-CAM layout.

Names and freeze policy are declared in `cushing.model_names` (the bottom layer the typed configuration checks
against); this registry holds one spec per name, and nothing else holds a timm id or branches on a model's name.
Normalisation and interpolation come from timm's pretrained config of the built model.
"""
from __future__ import annotations

import os
from contextlib import nullcontext
from dataclasses import dataclass
from functools import reduce
from pathlib import Path
from typing import Callable

from cushing.model_names import FROZEN_BY_DEFAULT, MODEL_NAMES, resolve_freeze

__all__ = ["BackboneSpec", "REGISTRY", "MODEL_NAMES", "get_spec", "build_model", "WeightsUnavailable", "resolve_freeze",
           "interpolation_of", "Preprocess", "preprocess_of", "cam_target_layer", "cam_reshape", "cam_grid",
           "last_block", "param_count"]


@dataclass(frozen=True)
class BackboneSpec:
    """What a backbone is (its identity), not how fast it runs: measured costs live in the sweep planner."""

    name: str
    timm_id: str  # architecture.pretrained_tag
    family: str  # densenet | resnet | vit | swin | dinov2
    kind: str  # the paper's model type, for Table II
    cam_layer: str  # dotted path inside the timm model, negative indexes allowed
    layout: str  # activations at cam_layer: "nchw" (CNN), "tokens" (prefix + grid tokens), "nhwc" (Swin)
    channels_last: bool  # CNNs run faster in channels_last on tensor cores
    size_kwarg: bool  # the model takes img_size at creation (ViT family); Swin/CNN do not need it
    last_block: str  # re-initialised (with the head) by the Grad-CAM randomisation sanity check

    @property
    def default_freeze(self) -> bool:
        """The freeze policy of `cushing.model_names` (DINOv2 frozen, the others fine-tuned)."""
        return self.name in FROZEN_BY_DEFAULT


# family -> kind (the paper's model type), cam_layer, layout, channels_last, size_kwarg, last_block. ViT and DINOv2:
# the CLS-pooled output has no gradient on patch tokens after the last block, so the CAM hooks its norm1.
_FAMILIES = {
    "densenet": ("CNN", "features.norm5", "nchw", True, False, "features.denseblock4"),
    "resnet": ("CNN", "layer4.-1", "nchw", True, False, "layer4.-1"),
    "vit": ("ViT", "blocks.-1.norm1", "tokens", False, True, "blocks.-1"),
    "swin": ("Swin", "layers.-1.blocks.-1.norm1", "nhwc", False, False, "layers.-1.blocks.-1"),
    "dinov2": ("DINOv2", "blocks.-1.norm1", "tokens", False, True, "blocks.-1"),
}


def _spec(family: str, name: str, timm_id: str = "") -> BackboneSpec:
    return BackboneSpec(name, timm_id or f"{name}.tv_in1k", family, *_FAMILIES[family])


REGISTRY: dict[str, BackboneSpec] = {s.name: s for s in [
    *(_spec("densenet", n) for n in ("densenet121", "densenet161", "densenet169", "densenet201")),
    *(_spec("resnet", n) for n in ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")),
    _spec("vit", "vit_b_16", "vit_base_patch16_224.augreg2_in21k_ft_in1k"),
    _spec("vit", "vit_b_32", "vit_base_patch32_224.augreg_in21k_ft_in1k"),
    _spec("vit", "vit_l_16", "vit_large_patch16_224.augreg_in21k_ft_in1k"),
    _spec("vit", "vit_l_32", "vit_large_patch32_224.orig_in21k"),
    _spec("swin", "swin_t", "swin_tiny_patch4_window7_224.ms_in1k"),
    _spec("swin", "swin_s", "swin_small_patch4_window7_224.ms_in1k"),
    _spec("swin", "swin_b", "swin_base_patch4_window7_224.ms_in1k"),
    _spec("swin", "swin_l", "swin_large_patch4_window7_224.ms_in22k_ft_in1k"),
    _spec("dinov2", "dinov2_s", "vit_small_patch14_dinov2.lvd142m"),
    _spec("dinov2", "dinov2_b", "vit_base_patch14_dinov2.lvd142m"),
    _spec("dinov2", "dinov2_l", "vit_large_patch14_dinov2.lvd142m"),
]}


def get_spec(name: str) -> BackboneSpec:
    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; choose one of: {' '.join(MODEL_NAMES)}") from None


def interpolation_of(name: str) -> str:
    """Resize interpolation of the backbone's pretrained config, read without building the model."""
    import timm

    cfg = timm.models.get_pretrained_cfg(get_spec(name).timm_id).to_dict()
    return str(cfg.get("interpolation", "bicubic"))


class WeightsUnavailable(RuntimeError):
    """Pretrained weights could not be loaded; the message says how to provide them."""


def _weights_help(spec: BackboneSpec, cause: BaseException | str) -> str:
    return (f"pretrained weights for {spec.name} ({spec.timm_id}) could not be loaded: {cause}\n"
            f"Provide them in one of two ways:\n"
            f"  1. a local file: -P weights=/path/to/{spec.timm_id.split('.')[0]}.safetensors (or .pth / .bin state "
            f"dict; `cushing train --weights FILE`)\n"
            f"  2. a populated Hugging Face cache: on a machine with internet run "
            f"`huggingface-cli download timm/{spec.timm_id}` and copy ~/.cache/huggingface (or $HF_HOME) here; "
            f"set HF_HUB_OFFLINE=1 to use it offline\n"
            f"or train from random weights with -P pretrained=false.")


def _create(spec: BackboneSpec, *, pretrained: bool, weights: str | None, num_classes: int, img_size: int,
            meta: bool = False):
    import timm
    import torch

    kwargs: dict = {"num_classes": num_classes, **({"img_size": img_size} if spec.size_kwarg else {})}
    if weights:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise WeightsUnavailable(_weights_help(spec, f"weights file {str(path)!r} does not exist"))
        kwargs["pretrained_cfg_overlay"] = {"file": str(path.resolve())}
    load = pretrained or bool(weights)
    try:
        with torch.device("meta") if meta else nullcontext():
            return timm.create_model(spec.timm_id, pretrained=load, **kwargs)
    except Exception as e:  # hub, HTTP and file errors share no importable base class
        if not load:
            raise
        first = (str(e).splitlines() or [""])[0][:300]
        raise WeightsUnavailable(_weights_help(spec, f"{type(e).__name__}: {first}")) from e


def build_model(name: str, *, pretrained: bool = True, weights: str | None = None, num_classes: int = 2,
                img_size: int = 224, freeze: bool | None = None):
    """The timm model for a paper name with a fresh `num_classes` head. freeze=None uses the registry's policy; a
    frozen model has requires_grad only on the head, so an optimiser over the parameters that do trains the head."""
    spec = get_spec(name)
    if pretrained and not weights and os.environ.get("CUSHING_OFFLINE") == "1":
        raise WeightsUnavailable(_weights_help(spec, "CUSHING_OFFLINE=1 forbids downloads"))
    model = _create(spec, pretrained=pretrained, weights=weights, num_classes=num_classes, img_size=img_size)
    if resolve_freeze(name, freeze):
        model.requires_grad_(False)
        model.get_classifier().requires_grad_(True)
    return model


def param_count(name: str, img_size: int = 224) -> int:
    """Parameter count without allocating weights (meta device)."""
    model = _create(get_spec(name), pretrained=False, weights=None, num_classes=2, img_size=img_size, meta=True)
    return sum(p.numel() for p in model.parameters())


@dataclass(frozen=True)
class Preprocess:
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str
    img_size: int

    @classmethod
    def from_model_config(cls, c: dict) -> "Preprocess":
        """From a logged model's config (release: mean, std, interpolation, img_size)."""
        return cls(tuple(map(float, c["mean"])), tuple(map(float, c["std"])), str(c.get("interpolation", "bicubic")),
                   int(c["img_size"]))


def preprocess_of(model, img_size: int) -> Preprocess:
    """From the model's pretrained config, as timm resolves it (ImageNet's mean/std and bicubic where it says none)."""
    from timm.data import resolve_model_data_config

    return Preprocess.from_model_config({**resolve_model_data_config(model), "img_size": img_size})


def _resolve(model, dotted: str):
    def step(obj, part: str):
        return obj[int(part)] if part.lstrip("-").isdigit() else getattr(obj, part)
    return reduce(step, dotted.split("."), model)


def cam_target_layer(model, name: str):
    return _resolve(model, get_spec(name).cam_layer)


def last_block(model, name: str):
    return _resolve(model, get_spec(name).last_block)


def cam_grid(model, name: str, img_size: int) -> tuple[int, int]:
    """The spatial grid of the activations at the CAM layer, read from the built model."""
    layout = get_spec(name).layout
    if layout == "tokens":
        return tuple(int(v) for v in model.patch_embed.grid_size)
    stride = int(model.feature_info[-1]["reduction"])
    side = img_size // stride if layout == "nhwc" else -(-img_size // stride)  # Swin floors; CNNs pad, so round up
    return (side, side)


def cam_reshape(model, name: str) -> Callable | None:
    """Activation -> [B, C, H, W] for pytorch-grad-cam; None when the layer is already NCHW."""
    spec = get_spec(name)
    if spec.layout == "nchw":
        return None
    if spec.layout == "nhwc":
        return lambda t: t.permute(0, 3, 1, 2)
    n_prefix = int(getattr(model, "num_prefix_tokens", 1))
    gh, gw = (int(v) for v in model.patch_embed.grid_size)

    def tokens_to_grid(t):
        grid = t[:, n_prefix:, :]
        if grid.shape[1] != gh * gw:
            raise ValueError(f"{name}: {grid.shape[1]} patch tokens, expected {gh}x{gw} after {n_prefix} prefix tokens")
        return grid.reshape(t.shape[0], gh, gw, t.shape[-1]).permute(0, 3, 1, 2)
    return tokens_to_grid
