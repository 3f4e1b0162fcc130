"""Grad-CAM per backbone family: right grid, finite and informative maps, hooks released, inputs untouched;
PHI-safe aggregates by default."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from cushing.model.backbones import build_model, cam_grid, cam_reshape, cam_target_layer
from cushing.model.explain import (REGIONS, cams_and_raw, compute_cams, explain_images, landmark_regions,
                                   randomization_check, region_shares, spearman, template_regions)

FAMILIES = [("resnet18", None, 64), ("densenet121", None, 64), ("vit_b_16", None, 64), ("vit_b_32", None, 224),
            ("swin_t", None, 224), ("dinov2_s", True, 224), ("dinov2_s", False, 56)]


def _no_hooks(model) -> bool:
    return all(not m._forward_hooks and not m._backward_hooks and not m._forward_pre_hooks for m in model.modules())


@pytest.mark.parametrize("name,freeze,size", FAMILIES)
def test_cam_for_each_family(name, freeze, size):
    torch.manual_seed(0)
    model = build_model(name, pretrained=False, img_size=size, freeze=freeze).eval()
    x = torch.randn(3, 3, size, size)
    before = x.clone()
    maps = compute_cams(model, name, x)
    assert maps.shape == (3, size, size)
    assert np.isfinite(maps).all() and (maps >= 0).all() and (maps <= 1 + 1e-6).all()
    assert all(np.ptp(m) > 0 for m in maps), "maps are not constant"
    assert torch.equal(x, before), "inputs are not mutated"
    assert _no_hooks(model), "hooks are released"
    assert all(p.grad is None for p in model.parameters())
    if freeze:
        assert not any(p.requires_grad for n, p in model.named_parameters() if not n.startswith("head"))


def _pytorch_grad_cam(model, name, x, batch=32):
    """The maps and raw maps as pytorch-grad-cam's GradCAM made them (the project's implementation before it
    computed them itself, from a backward that stops at the CAM layer)."""
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    cam = GradCAM(model=model, target_layers=[cam_target_layer(model, name)],
                  reshape_transform=cam_reshape(model, name))
    cam.compute_input_gradient = True
    maps, raws = [], []
    try:
        for i in range(0, len(x), batch):
            xb = x[i:i + batch].detach().clone().float()
            maps.append(cam(input_tensor=xb, targets=[ClassifierOutputTarget(1)] * len(xb)).astype(np.float32))
            acts = cam.activations_and_grads.activations[0].float().numpy()
            grads = cam.activations_and_grads.gradients[0].float().numpy()
            raws.append((grads.mean(axis=(2, 3))[:, :, None, None] * acts).sum(1).astype(np.float32))
    finally:
        cam.activations_and_grads.release()
        model.zero_grad(set_to_none=True)
    return np.concatenate(maps), np.concatenate(raws)


@pytest.mark.parametrize("name,freeze,size", [f for f in FAMILIES if f[0] != "vit_b_32"])
def test_cams_equal_pytorch_grad_cams(name, freeze, size):
    """The maps (and the raw maps of the randomization check) are pytorch-grad-cam's GradCAM maps, computed in
    one pass whose backward stops at the CAM layer."""
    torch.manual_seed(0)
    model = build_model(name, pretrained=False, img_size=size, freeze=freeze).eval()
    x = torch.randn(3, 3, size, size)
    maps, raw = cams_and_raw(model, name, x)
    ref_maps, ref_raw = _pytorch_grad_cam(model, name, x)
    np.testing.assert_allclose(maps, ref_maps, rtol=0, atol=1e-5)
    np.testing.assert_allclose(raw, ref_raw, rtol=1e-4, atol=1e-6 * float(np.abs(ref_raw).max()))
    assert _no_hooks(model) and all(p.grad is None for p in model.parameters())
    assert [p.requires_grad for p in model.parameters()] == \
        [p.requires_grad for p in build_model(name, pretrained=False, img_size=size, freeze=freeze).parameters()]


def test_a_batched_cam_pass_equals_the_per_image_maps():
    torch.manual_seed(0)
    model = build_model("resnet18", pretrained=False, img_size=64).eval()
    x = torch.randn(7, 3, 64, 64)
    maps, raw = cams_and_raw(model, "resnet18", x, batch=7)
    one = [cams_and_raw(model, "resnet18", x[i:i + 1], batch=1) for i in range(7)]
    np.testing.assert_allclose(maps, np.concatenate([m for m, _ in one]), rtol=0, atol=1e-5)
    np.testing.assert_allclose(raw, np.concatenate([r for _, r in one]), rtol=1e-4, atol=1e-7)
    assert model.training is False and compute_cams(model, "resnet18", x, batch=3).shape == (7, 64, 64)


def test_spearman_is_scipys():
    from scipy.stats import spearmanr

    rng = np.random.default_rng(0)
    for _ in range(5):
        a = rng.random((4, 4)).astype(np.float32)
        b = np.round(rng.random((4, 4)), 1)  # ties: averaged ranks
        assert spearman(a, b) == spearmanr(a.ravel(), b.ravel()).statistic


def test_token_grids_are_read_from_the_model():
    d = build_model("dinov2_s", pretrained=False, img_size=224)
    assert cam_grid(d, "dinov2_s", 224) == (16, 16)  # patch 14 at 224, not the 14x14 of stock reshapes
    acts = {}
    h = cam_target_layer(d, "dinov2_s").register_forward_hook(lambda m, i, o: acts.setdefault("a", o))
    with torch.no_grad():
        d(torch.randn(1, 3, 224, 224))
    h.remove()
    assert acts["a"].shape[1] == 1 + 16 * 16
    assert cam_reshape(d, "dinov2_s")(acts["a"]).shape[-2:] == (16, 16)
    v = build_model("vit_b_32", pretrained=False, img_size=224)
    assert cam_grid(v, "vit_b_32", 224) == (7, 7)
    s = build_model("swin_t", pretrained=False)
    assert cam_grid(s, "swin_t", 224) == (7, 7)


def test_register_tokens_are_dropped():
    """A DINOv2 variant with registers has 5 prefix tokens; the reshape must skip them all."""
    import timm

    m = timm.create_model("vit_small_patch14_reg4_dinov2", pretrained=False, num_classes=2, img_size=56)
    assert m.num_prefix_tokens == 5
    from cushing.model import backbones

    fn = backbones.cam_reshape(m, "dinov2_s")  # same family layout, prefix count read from the model
    tokens = torch.randn(2, 5 + 4 * 4, 384)
    assert fn(tokens).shape == (2, 384, 4, 4)
    assert torch.equal(fn(tokens)[:, :, 0, 0], tokens[:, 5, :])


def test_randomization_check_is_computed():
    torch.manual_seed(0)
    model = build_model("resnet18", pretrained=False, img_size=64).eval()
    x = torch.randn(4, 3, 64, 64)
    raw = compute_cams(model, "resnet18", x, raw=True)
    assert raw.shape == (4, 2, 2) and np.isfinite(raw).all()
    assert (np.ptp(raw.reshape(4, -1), axis=1) > 0).all(), "raw maps keep their ranking (no ReLU flattening)"
    rho = randomization_check(model, "resnet18", x)
    assert -1 <= rho <= 1
    assert randomization_check(model, "resnet18", x, seed=0) == rho  # seeded
    # the main pass's raw maps, handed over, give the same value without recomputing the trained maps
    assert randomization_check(model, "resnet18", x, seed=0, trained_raw=raw) == rho
    assert _no_hooks(model)


def test_regions_cover_the_crop_and_shares_sum_to_one():
    lab = template_regions(112)
    assert set(np.unique(lab)) == set(range(len(REGIONS)))
    maps = np.random.default_rng(0).random((5, 112, 112)).astype(np.float32)
    shares = region_shares(maps, np.broadcast_to(lab, maps.shape))
    assert np.allclose(shares.sum(1), 1.0, atol=1e-5)
    # a synthetic 68-point face: jaw arc, brows, eyes, nose, mouth in the usual places
    pts = np.zeros((68, 2))
    pts[0:17] = np.c_[np.linspace(45, 179, 17), 90 + 90 * np.sin(np.linspace(0, np.pi, 17))]
    pts[17:27] = np.c_[np.linspace(60, 164, 10), np.full(10, 80)]
    pts[27:36] = np.c_[np.full(9, 112), np.linspace(95, 140, 9)]
    pts[36:48] = np.c_[np.r_[np.linspace(70, 100, 6), np.linspace(124, 154, 6)], np.full(12, 95)]
    pts[48:68] = np.c_[np.linspace(90, 134, 20), np.full(20, 160)]
    lab = landmark_regions(pts, 224)
    assert lab[95, 85] == REGIONS.index("periorbital") and lab[150, 112] == REGIONS.index("nose_mouth")
    assert lab[40, 112] == REGIONS.index("forehead") and lab[5, 5] == REGIONS.index("neck_background")
    assert lab[125, 75] == REGIONS.index("cheeks") and lab[170, 112] == REGIONS.index("chin_jowls")


def test_aggregates_only_unless_phi_allowed(tmp_path):
    torch.manual_seed(0)
    model = build_model("resnet18", pretrained=False, img_size=64).eval()
    x = torch.randn(6, 3, 64, 64)
    imgs = np.random.default_rng(0).integers(0, 255, (6, 3, 64, 64), dtype=np.uint8)
    kw = dict(images_u8=imgs, labels=np.array([0, 0, 1, 1, 0, 1]), preds=np.array([0, 1, 1, 0, 0, 1]),
              sexes=np.array(list("FFMMFM")), subjects=[f"h{i:02d}" for i in range(6)])
    rep = explain_images(model, "resnet18", x, out_dir=tmp_path / "safe", **kw)
    files = {p.relative_to(tmp_path / "safe").as_posix() for p in (tmp_path / "safe").rglob("*") if p.is_file()}
    assert "cam_regions.csv" in files and "cam/mean_all.png" in files and "cam/mean_true1_pred1_male.png" in files
    assert not any("overlays" in f for f in files)
    assert -1 <= rep.metrics["cam/randomization_spearman"] <= 1
    assert rep.tags["cam_region_source"].startswith("template")
    rep = explain_images(model, "resnet18", x, out_dir=tmp_path / "phi", allow_phi=True, **kw)
    overlays = sorted(p.name for p in (tmp_path / "phi" / "cam" / "overlays").iterdir())
    assert overlays == [f"h{i:02d}_{i}.png" for i in range(6)]  # hashed subject ids, never file names
