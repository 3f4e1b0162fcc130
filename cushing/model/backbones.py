"""The one backbone registry: paper model names -> timm models, freeze policy, Grad-CAM layout.

The names and the freeze policy are declared in `cushing.model_names` (the bottom layer, so the typed
configuration can check them without importing this package); this registry holds one spec per name.

Nothing else in the package holds a timm id or branches on a model's name; callers ask this module.
Normalisation and interpolation come from timm's pretrained config of the built model.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from functools import reduce
from pathlib import Path
from typing import Callable

from cushing.model_names import FROZEN_BY_DEFAULT, MODEL_NAMES, resolve_freeze

__all__ = [
    "BackboneSpec", "REGISTRY", "MODEL_NAMES", "get_spec", "build_model", "WeightsUnavailable", "resolve_freeze",
    "interpolation_of",
    "Preprocess", "preprocess_of", "cam_target_layer", "cam_reshape", "cam_grid", "last_block", "param_count", "head_of",
]


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

    @property
    def architecture(self) -> str:
        return self.timm_id.split(".")[0]

    @property
    def hub_id(self) -> str:
        return f"timm/{self.timm_id}"


def _cnn(name: str, tag: str, family: str) -> BackboneSpec:
    layer, block = ("layer4.-1", "layer4.-1") if family == "resnet" else ("features.norm5", "features.denseblock4")
    return BackboneSpec(name=name, timm_id=f"{name}.{tag}", family=family, kind="CNN",
                        cam_layer=layer, layout="nchw", channels_last=True, size_kwarg=False, last_block=block)


def _vit(name: str, timm_id: str) -> BackboneSpec:
    # The CLS-pooled output has no gradient on patch tokens after the last block: hook the last block's norm1.
    return BackboneSpec(name=name, timm_id=timm_id, family="vit", kind="ViT",
                        cam_layer="blocks.-1.norm1", layout="tokens", channels_last=False, size_kwarg=True,
                        last_block="blocks.-1")


def _swin(name: str, timm_id: str) -> BackboneSpec:
    return BackboneSpec(name=name, timm_id=timm_id, family="swin", kind="Swin",
                        cam_layer="layers.-1.blocks.-1.norm1", layout="nhwc", channels_last=False, size_kwarg=False,
                        last_block="layers.-1.blocks.-1")


def _dinov2(name: str, timm_id: str) -> BackboneSpec:
    return BackboneSpec(name=name, timm_id=timm_id, family="dinov2", kind="DINOv2",
                        cam_layer="blocks.-1.norm1", layout="tokens", channels_last=False, size_kwarg=True,
                        last_block="blocks.-1")


REGISTRY: dict[str, BackboneSpec] = {s.name: s for s in [
    *(_cnn(n, "tv_in1k", "densenet") for n in ("densenet121", "densenet161", "densenet169", "densenet201")),
    *(_cnn(n, "tv_in1k", "resnet") for n in ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")),
    _vit("vit_b_16", "vit_base_patch16_224.augreg2_in21k_ft_in1k"),
    _vit("vit_b_32", "vit_base_patch32_224.augreg_in21k_ft_in1k"),
    _vit("vit_l_16", "vit_large_patch16_224.augreg_in21k_ft_in1k"),
    _vit("vit_l_32", "vit_large_patch32_224.orig_in21k"),
    _swin("swin_t", "swin_tiny_patch4_window7_224.ms_in1k"),
    _swin("swin_s", "swin_small_patch4_window7_224.ms_in1k"),
    _swin("swin_b", "swin_base_patch4_window7_224.ms_in1k"),
    _swin("swin_l", "swin_large_patch4_window7_224.ms_in22k_ft_in1k"),
    _dinov2("dinov2_s", "vit_small_patch14_dinov2.lvd142m"),
    _dinov2("dinov2_b", "vit_base_patch14_dinov2.lvd142m"),
    _dinov2("dinov2_l", "vit_large_patch14_dinov2.lvd142m"),
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
    return (
        f"pretrained weights for {spec.name} ({spec.timm_id}) could not be loaded: {cause}\n"
        f"Provide them in one of two ways:\n"
        f"  1. a local file: -P weights=/path/to/{spec.architecture}.safetensors (or .pth / .bin state dict; "
        f"`cushing train --weights FILE`)\n"
        f"  2. a populated Hugging Face cache: on a machine with internet run "
        f"`huggingface-cli download {spec.hub_id}` and copy ~/.cache/huggingface (or $HF_HOME) here; "
        f"set HF_HUB_OFFLINE=1 to use it offline\n"
        f"or train from random weights with -P pretrained=false."
    )


def _create(spec: BackboneSpec, *, pretrained: bool, weights: str | None, num_classes: int, img_size: int,
            meta: bool = False):
    import timm
    import torch

    kwargs: dict = {"num_classes": num_classes}
    if spec.size_kwarg:
        kwargs["img_size"] = img_size
    if weights:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise WeightsUnavailable(_weights_help(spec, f"weights file {str(path)!r} does not exist"))
        kwargs["pretrained_cfg_overlay"] = {"file": str(path.resolve())}
    if meta:
        with torch.device("meta"):
            return timm.create_model(spec.timm_id, pretrained=False, **kwargs)
    try:
        return timm.create_model(spec.timm_id, pretrained=pretrained or bool(weights), **kwargs)
    except Exception as e:  # hub, HTTP and file errors share no importable base class
        if not (pretrained or weights):
            raise
        first = (str(e).splitlines() or [""])[0][:300]
        raise WeightsUnavailable(_weights_help(spec, f"{type(e).__name__}: {first}")) from e


def build_model(name: str, *, pretrained: bool = True, weights: str | None = None, num_classes: int = 2,
                img_size: int = 224, freeze: bool | None = None):
    """Build the timm model for a paper name with a fresh `num_classes` head.

    freeze=None uses the registry's policy. A frozen model has requires_grad only on the head, so an optimiser
    over `p for p in model.parameters() if p.requires_grad` trains the head alone.
    """
    spec = get_spec(name)
    if pretrained and not weights and os.environ.get("CUSHING_OFFLINE") == "1":
        raise WeightsUnavailable(_weights_help(spec, "CUSHING_OFFLINE=1 forbids downloads"))
    model = _create(spec, pretrained=pretrained, weights=weights, num_classes=num_classes, img_size=img_size)
    frozen = resolve_freeze(name, freeze)
    if frozen:
        for p in model.parameters():
            p.requires_grad_(False)
        for p in head_of(model).parameters():
            p.requires_grad_(True)
    return model


def head_of(model):
    """The classifier layer that `forward_head(..., pre_logits=True)` features feed."""
    return model.get_classifier()


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
        return cls(tuple(c["mean"]), tuple(c["std"]), c.get("interpolation", "bicubic"), int(c["img_size"]))


def preprocess_of(model, img_size: int) -> Preprocess:
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    return Preprocess(
        mean=tuple(float(v) for v in cfg.get("mean", (0.485, 0.456, 0.406))),
        std=tuple(float(v) for v in cfg.get("std", (0.229, 0.224, 0.225))),
        interpolation=str(cfg.get("interpolation", "bicubic")),
        img_size=img_size,
    )


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
    spec = get_spec(name)
    if spec.layout == "tokens":
        return tuple(int(v) for v in model.patch_embed.grid_size)
    if spec.layout == "nhwc":
        stride = int(model.feature_info[-1]["reduction"])
        return (img_size // stride, img_size // stride)
    stride = int(model.feature_info[-1]["reduction"])
    return (-(-img_size // stride), -(-img_size // stride))


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
