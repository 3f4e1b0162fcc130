"""The backbone registry, parametrised over all 20 paper names."""
from __future__ import annotations

import re

import pytest
import timm
import torch

from cushing.model.backbones import (MODEL_NAMES, REGISTRY, WeightsUnavailable, build_model, cam_grid, cam_reshape,
                               cam_target_layer, get_spec, param_count, preprocess_of)

PAPER_NAMES = ("densenet121 densenet161 densenet169 densenet201 resnet18 resnet34 resnet50 resnet101 resnet152 "
               "vit_b_16 vit_b_32 vit_l_16 vit_l_32 swin_t swin_s swin_b swin_l dinov2_s dinov2_b dinov2_l").split()
SMALL = {"resnet18", "densenet121", "vit_b_32", "swin_t", "dinov2_s"}


def test_registry_holds_exactly_the_paper_names():
    assert list(MODEL_NAMES) == PAPER_NAMES


def test_the_registry_and_the_light_model_list_agree():
    """The configuration checks names against `cushing.model_names`; the registry must hold a spec for exactly
    those names, in that order, and the freeze policy both report must be the same."""
    from cushing import model_names

    assert tuple(REGISTRY) == model_names.MODEL_NAMES == MODEL_NAMES
    assert {n for n, s in REGISTRY.items() if s.default_freeze} == model_names.FROZEN_BY_DEFAULT
    assert {n: model_names.resolve_freeze(n, None) for n in REGISTRY} == {n: s.default_freeze
                                                                          for n, s in REGISTRY.items()}
    with pytest.raises(ValueError, match="unknown model 'vgg16'"):
        model_names.resolve_freeze("vgg16", None)


def _size(name: str) -> int:
    # Swin's 7x7 windows need 224; the others run at a small size to keep the suite fast.
    return 224 if get_spec(name).family == "swin" else (56 if get_spec(name).family == "dinov2" else 64)


@pytest.mark.parametrize("name", PAPER_NAMES)
def test_build_forward_and_policy(name):
    spec = get_spec(name)
    size = _size(name)
    torch.manual_seed(0)
    model = build_model(name, pretrained=False, img_size=size).eval()
    # the timm id resolves to a real pretrained config (tag included), so pretrained loading can find it
    assert timm.models.get_pretrained_cfg(spec.timm_id) is not None
    pre = preprocess_of(model, size)
    assert pre.mean == tuple(timm.models.get_pretrained_cfg(spec.timm_id).mean)
    with torch.no_grad():
        out = model(torch.randn(2, 3, size, size))
    assert out.shape == (2, 2) and torch.isfinite(out).all()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    head = {f"{n}" for n, _ in model.named_parameters() if n.startswith(_head_prefix(model))}
    if spec.default_freeze:
        assert spec.family == "dinov2"
        assert trainable == head, "a frozen backbone trains only its head"
    else:
        assert len(trainable) == len(list(model.parameters()))
    # the CAM layer exists and its reshape yields the grid the model says
    layer = cam_target_layer(model, name)
    acts = {}
    h = layer.register_forward_hook(lambda m, i, o: acts.setdefault("a", o))
    with torch.no_grad():
        model(torch.randn(1, 3, size, size))
    h.remove()
    reshape = cam_reshape(model, name)
    grid = (reshape(acts["a"]) if reshape else acts["a"]).shape[-2:]
    assert tuple(grid) == cam_grid(model, name, size)


def _head_prefix(model) -> str:
    head = model.get_classifier()
    return next(n for n, m in model.named_modules() if m is head) + "."


@pytest.mark.parametrize("name", sorted(SMALL))
def test_backward_small(name):
    size = _size(name)
    model = build_model(name, pretrained=False, img_size=size, freeze=False).train()
    loss = model(torch.randn(2, 3, size, size)).logsumexp(1).mean()
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_dinov2_grid_is_16x16_at_224_and_vit_b32_7x7():
    d = build_model("dinov2_s", pretrained=False, img_size=224)
    assert cam_grid(d, "dinov2_s", 224) == (16, 16)
    assert d.num_prefix_tokens == 1
    v = build_model("vit_b_32", pretrained=False, img_size=224)
    assert cam_grid(v, "vit_b_32", 224) == (7, 7)


def test_freeze_override_fine_tunes_dinov2():
    m = build_model("dinov2_s", pretrained=False, img_size=56, freeze=False)
    assert all(p.requires_grad for p in m.parameters())
    m = build_model("resnet18", pretrained=False, img_size=64, freeze=True)
    assert {n for n, p in m.named_parameters() if p.requires_grad} == {"fc.weight", "fc.bias"}


def test_local_weights_file_loads_through_timm(tmp_path):
    """A state dict saved to a file goes through timm's own pretrained path (pretrained_cfg_overlay=file)."""
    from safetensors.torch import save_file

    torch.manual_seed(1)
    source = timm.create_model("resnet18", pretrained=False, num_classes=1000)
    path = tmp_path / "resnet18.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    model = build_model("resnet18", pretrained=True, weights=str(path), img_size=64)
    got = model.state_dict()
    for k, v in source.state_dict().items():
        if k.startswith("fc."):
            continue
        assert torch.equal(got[k], v), k
    assert got["fc.weight"].shape == (2, 512)  # a fresh two-class head


def test_missing_weights_fail_with_instructions(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-hf"))
    with pytest.raises(WeightsUnavailable) as e:
        build_model("resnet18", pretrained=True, img_size=64)
    msg = str(e.value)
    assert "resnet18.tv_in1k" in msg and "-P weights=" in msg and "huggingface-cli download timm/resnet18.tv_in1k" in msg
    with pytest.raises(WeightsUnavailable, match="does not exist"):
        build_model("resnet18", pretrained=True, weights=str(tmp_path / "nope.safetensors"))


def test_pretrained_false_needs_no_network(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import socket

    def no_network(*a, **k):
        raise AssertionError("pretrained=false must not open a connection")
    monkeypatch.setattr(socket.socket, "connect", no_network)
    model = build_model("vit_b_32", pretrained=False, img_size=64).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, 2)


def test_param_counts_match_built_models():
    assert param_count("resnet18") == sum(p.numel() for p in build_model("resnet18", pretrained=False).parameters())
    assert 300e6 < param_count("vit_l_16") < 310e6


def test_unknown_name_lists_choices():
    with pytest.raises(ValueError, match=re.escape("swin_b")):
        get_spec("swin_x")
    assert len(REGISTRY) == 20
