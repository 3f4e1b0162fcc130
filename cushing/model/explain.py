"""Grad-CAM for every backbone family, PHI-safe aggregates by default; writes only to the folder it is given.

The target layer and the token-to-grid reshape come from the backbone registry. Default artifacts are aggregates:
mean CAM maps per true label x predicted label x sex, drawn without any face pixels, and the share of CAM mass per
facial region. Overlays on individual faces exist only when allow_phi is set, named by hashed subject id.
"""
from __future__ import annotations

import copy
import json
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd
import torch

from cushing import stops
from cushing.model.augment import DeviceAugment
from cushing.model.backbones import cam_reshape, cam_target_layer, last_block
from cushing.phases import phase
from cushing.stats.plots import pyplot

__all__ = ["compute_cams", "cams_and_raw", "spearman", "CamReport", "explain_outcome", "explain_images", "region_masks",
           "REGIONS", "randomization_check", "template_regions", "landmark_regions", "landmarks_of"]

REGIONS = ("forehead", "periorbital", "cheeks", "nose_mouth", "chin_jowls", "neck_background")


@contextmanager
def _graph_from(model, name: str) -> Iterator[dict]:
    """While open, the CAM layer's output is a fresh autograd leaf (filled into the dict's "leaf" by a forward) and
    weights need no gradient, so backward runs only from the logits down to that layer; all is put back on exit."""
    layer = cam_target_layer(model, name)
    flags = [p.requires_grad for p in model.parameters()]
    model.requires_grad_(False)
    seen: dict = {}

    def start_graph(module, inputs, output):
        seen["leaf"] = output.detach().requires_grad_(True)
        return seen["leaf"].clone()  # not the leaf itself: an in-place op downstream would refuse a leaf
    handle = layer.register_forward_hook(start_graph)
    try:
        yield seen
    finally:
        handle.remove()
        for p, flag in zip(model.parameters(), flags):
            p.requires_grad_(flag)


def _scaled(cams: np.ndarray, size: tuple[int, int] | None = None) -> np.ndarray:
    """Each map shifted to 0 and divided by (1e-7 + its max), then resized to `size` (width, height) bilinearly:
    pytorch-grad-cam's `scale_cam_image`, whose maps these are."""
    import cv2

    m = cams - cams.min(axis=(1, 2), keepdims=True)
    m = np.float32(m / (1e-7 + m.max(axis=(1, 2), keepdims=True)))
    return np.float32([cv2.resize(x, size) for x in m]) if size is not None else m


def _cam_batch(model, name: str, x: torch.Tensor, target: int) -> tuple[np.ndarray, np.ndarray]:
    """(maps in [0, 1] at the input size, raw grid maps) of one batch: pytorch-grad-cam's GradCAM with
    ClassifierOutputTarget(target) (raw map = activations weighted by the gradient's spatial mean; map = its ReLU,
    rescaled), from one forward and a backward that stops at the CAM layer."""
    reshape = cam_reshape(model, name) or (lambda t: t)
    with _graph_from(model, name) as seen, torch.enable_grad():
        logits = model(x)
        (grad,) = torch.autograd.grad(logits[:, target].sum(), seen["leaf"])
    acts = reshape(seen["leaf"].detach()).float().cpu().numpy()
    grads = reshape(grad).float().cpu().numpy()
    raw = (grads.mean(axis=(2, 3))[:, :, None, None] * acts).sum(1).astype(np.float32)
    return _scaled(np.maximum(_scaled(np.maximum(raw, 0), (x.shape[-1], x.shape[-2])), 0)), raw


def cams_and_raw(model, name: str, x: torch.Tensor, *, target: int = 1, batch: int = 32
                 ) -> tuple[np.ndarray, np.ndarray]:
    """([N, H, W] Grad-CAM maps in [0, 1], [N, h, w] raw grid maps) for class `target`, batched on x's device in
    eval mode (the model's mode is put back); x is not modified. The raw maps (before ReLU and rescaling) keep their
    ranking information even where the ReLU'd map is all zero."""
    was_training = model.training
    model.eval()
    parts = []
    try:
        for i in range(0, len(x), batch):
            stops.check()
            parts.append(_cam_batch(model, name, x[i:i + batch].detach().clone().float(), target))
    finally:
        model.train(was_training)
    if not parts:
        return np.zeros((0,) + tuple(x.shape[-2:]), np.float32), np.zeros((0, 0, 0), np.float32)
    return np.concatenate([m for m, _ in parts]), np.concatenate([r for _, r in parts])


def compute_cams(model, name: str, x: torch.Tensor, *, target: int = 1, batch: int = 32,
                 raw: bool = False) -> np.ndarray:
    """[N, H, W] Grad-CAM maps in [0, 1] for class `target` (raw=True: the raw grid maps); see `cams_and_raw`."""
    return cams_and_raw(model, name, x, target=target, batch=batch)[1 if raw else 0]


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rank correlation of two flattened maps."""
    from scipy.stats import spearmanr

    return float(spearmanr(np.ravel(a), np.ravel(b)).statistic)


def randomization_check(model, name: str, x: torch.Tensor, *, seed: int = 0, n: int = 32,
                        trained_raw: np.ndarray | None = None) -> float:
    """Adebayo et al.: mean Spearman correlation between the trained model's raw Grad-CAM maps (`trained_raw` when
    already computed) and those after the head and the last block are re-initialised (torch seeded with `seed`).
    Near 1 means the map does not depend on the learned weights."""
    k = min(n, len(x))
    if k == 0:
        return float("nan")
    trained = trained_raw[:k] if trained_raw is not None else compute_cams(model, name, x[:k], raw=True)
    rand = copy.deepcopy(model)
    torch.manual_seed(seed)
    for module in (rand.get_classifier(), last_block(rand, name)):
        for m in module.modules():
            if hasattr(m, "reset_parameters"):
                m.reset_parameters()
    rmaps = compute_cams(rand, name, x[:k], raw=True)
    rhos = [spearman(a, b) for a, b in zip(trained, rmaps) if np.ptp(a) > 0 and np.ptp(b) > 0]
    return float(np.mean(rhos)) if rhos else float("nan")


def template_regions(size: int) -> np.ndarray:
    """Region index per pixel for a centred, eye-level face filling an aligned square crop."""
    yy, xx = np.mgrid[0:size, 0:size] / float(size)
    lab = np.full((size, size), REGIONS.index("neck_background"), np.int8)
    face = ((xx - 0.5) / 0.36) ** 2 + ((yy - 0.5) / 0.46) ** 2 <= 1
    boxes = [("forehead", 0.06, 0.33, 0.2, 0.8), ("periorbital", 0.33, 0.47, 0.15, 0.85),
             ("cheeks", 0.47, 0.76, 0.12, 0.88), ("nose_mouth", 0.40, 0.78, 0.37, 0.63),
             ("chin_jowls", 0.76, 0.97, 0.2, 0.8)]
    for region, y0, y1, x0, x1 in boxes:
        lab[face & (yy >= y0) & (yy < y1) & (xx >= x0) & (xx < x1)] = REGIONS.index(region)
    return lab


def landmark_regions(points: np.ndarray, size: int) -> np.ndarray:
    """Region index per pixel from dlib's 68 landmarks (in crop pixels at `size`)."""
    import cv2

    p = np.asarray(points, np.float64).reshape(68, 2)
    lab = np.full((size, size), REGIONS.index("neck_background"), np.uint8)
    top = p[17:27, 1].min() - 0.9 * np.linalg.norm(p[45] - p[36])  # the forehead: about an eye-span above the brows

    def fill(poly, region):
        cv2.fillPoly(lab, [np.round(poly).astype(np.int32)], int(REGIONS.index(region)))
    fill(np.vstack([p[0:17], [[p[16][0], top], [p[0][0], top]]]), "cheeks")  # the jaw line closed at the top
    fill(np.vstack([[p[0][0], top], [p[16][0], top], p[26], p[17]]), "forehead")
    fill(np.vstack([p[4], p[5:12], p[12], p[54], p[57], p[48]]), "chin_jowls")
    fill(cv2.convexHull(np.vstack([p[17:27], p[36:48], p[[0, 16]]]).astype(np.float32))[:, 0], "periorbital")
    fill(cv2.convexHull(np.vstack([p[27:36], p[48:60]]).astype(np.float32))[:, 0], "nose_mouth")
    return lab.astype(np.int8)


def region_masks(n: int, size: int, landmarks: list | None) -> tuple[np.ndarray, str]:
    """[N, S, S] region labels and which source made them."""
    if landmarks is not None and all(lm is not None for lm in landmarks):
        return np.stack([landmark_regions(lm, size) for lm in landmarks]), "dlib_landmarks"
    return np.broadcast_to(template_regions(size), (n, size, size)), "template (aligned crop)"


def region_shares(maps: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """[N, R] share of each map's CAM mass in each region."""
    total = maps.reshape(len(maps), -1).sum(1) + 1e-12
    return np.stack([(maps * (labels == r)).reshape(len(maps), -1).sum(1) / total for r in range(len(REGIONS))], 1)


@dataclass
class CamReport:
    metrics: dict[str, float]
    tags: dict[str, str]


def _draw_mean(path: Path, m: np.ndarray, title: str, outline: np.ndarray) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(3.2, 3.4))
    ax.imshow(m, cmap="inferno", vmin=0, vmax=max(1e-6, float(m.max())))
    ax.contour(outline, levels=np.arange(len(REGIONS)) + 0.5, colors="white", linewidths=0.5, alpha=0.6)
    ax.set_title(title, fontsize=8)
    ax.axis("off")
    fig.subplots_adjust(left=0.02, right=0.98, bottom=0.02, top=0.91)  # fixed: tight_layout draws it twice
    fig.savefig(path, dpi=100)
    plt.close(fig)


def explain_images(model, name: str, x_norm: torch.Tensor, *, images_u8: np.ndarray, labels: np.ndarray,
                   preds: np.ndarray, sexes: np.ndarray, subjects: list[str], out_dir: Path,
                   allow_phi: bool = False, landmarks: list | None = None, seed: int = 0) -> CamReport:
    """CAMs of the positive class for a batch of images; aggregates (and, if allowed, overlays) into out_dir."""
    t0 = time.perf_counter()
    with phase("Grad-CAM maps"):
        maps, raw = cams_and_raw(model, name, x_norm)
    seconds = time.perf_counter() - t0
    with phase("Grad-CAM randomization check"):
        rho = randomization_check(model, name, x_norm, seed=seed, trained_raw=raw)
    with phase("Grad-CAM aggregates (figures, regions)"):
        return _aggregates(maps, rho, seconds, images_u8, labels, preds, sexes, subjects, out_dir, allow_phi,
                           landmarks)


def _aggregates(maps, rho, seconds, images_u8, labels, preds, sexes, subjects, out_dir, allow_phi, landmarks
                ) -> CamReport:
    size = maps.shape[-1]
    labs, source = region_masks(len(maps), size, landmarks)
    shares = region_shares(maps, labs)
    cam_dir = out_dir / "cam"
    cam_dir.mkdir(parents=True, exist_ok=True)
    keys = np.array([f"true{int(a)}_pred{int(b)}_{'female' if c == 'F' else 'male'}"
                     for a, b, c in zip(labels, preds, sexes)])
    outline = template_regions(size) if source.startswith("template") else np.round(labs.mean(0)).astype(np.int8)
    rows, means, counts = [], {}, []
    for key in sorted(set(keys)) + ["all"]:
        sel = keys == key if key != "all" else np.ones(len(keys), bool)
        means[key] = maps[sel].mean(0)
        counts.append(int(sel.sum()))
        _draw_mean(cam_dir / f"mean_{key}.png", means[key], f"{key.replace('_', ' ')} (n={counts[-1]})", outline)
        rows += [{"group": key, "n": counts[-1], "region": region, "share": float(shares[sel, r].mean()),
                  "region_source": source} for r, region in enumerate(REGIONS)]
    np.savez_compressed(cam_dir / "mean_maps.npz", **{k: v.astype(np.float16) for k, v in means.items()},
                        counts=np.array(counts), names=np.array(list(means)))
    pd.DataFrame(rows).to_csv(out_dir / "cam_regions.csv", index=False)
    (cam_dir / "README.txt").write_text(
        "Grad-CAM (positive class) with the best-epoch model on the test split. mean_*.png: mean map per true "
        "label x predicted label x sex, drawn without face pixels; outlines = facial regions "
        f"({source}). cam_regions.csv: share of CAM mass per region. Per-image overlays: "
        f"{'included (allow_phi_artifacts=true), named by hashed subject id' if allow_phi else 'not logged'}.\n")
    if allow_phi:
        from PIL import Image
        from pytorch_grad_cam.utils.image import show_cam_on_image

        (cam_dir / "overlays").mkdir(exist_ok=True)
        for i, (img, m, s) in enumerate(zip(images_u8, maps, subjects)):
            rgb = img.transpose(1, 2, 0).astype(np.float32) / 255.0
            Image.fromarray(show_cam_on_image(rgb, m, use_rgb=True)).save(cam_dir / "overlays" / f"{s}_{i}.png")
    return CamReport({"cam/randomization_spearman": rho, "cam/seconds": seconds, "cam/images": float(len(maps)),
                      **{f"cam/share/{region}": float(shares[:, r].mean()) for r, region in enumerate(REGIONS)}},
                     {"cam_region_source": source, "cam_overlays": str(bool(allow_phi)).lower()})


def landmarks_of(table: pd.DataFrame, idx: np.ndarray, size: int) -> list | None:
    if "face_landmarks" not in table.columns:
        return None
    out = []
    for v in table["face_landmarks"].iloc[idx]:
        if not isinstance(v, str) or not v.startswith("["):
            return None
        pts = np.asarray(json.loads(v), float).reshape(68, 2)
        out.append(pts * size / 224.0)  # face crops are 224 px; images were letterboxed to `size`
    return out


def explain_outcome(outcome, cohort, *, out_dir: Path, allow_phi: bool = False, split: str = "test") -> CamReport:
    """CAMs for a finished training: best-epoch model, the given split, positive class."""
    dev = next(outcome.model.parameters()).device
    idx = cohort.index(split)
    if len(idx) == 0:
        return CamReport({"cam/images": 0.0}, {"cam": f"no {split} images"})
    pred = outcome.predictions[outcome.predictions["split"] == split]
    images = cohort.images[torch.as_tensor(idx)]
    x = DeviceAugment(outcome.preprocess, dev, 0.0).normalize(images.to(dev)).contiguous()
    return explain_images(outcome.model, outcome.config.model, x, images_u8=images.numpy(),
                          labels=pred["label"].to_numpy(), preds=pred["prediction"].to_numpy(),
                          sexes=pred["sex"].to_numpy(), subjects=pred["subject"].tolist(), out_dir=out_dir,
                          allow_phi=allow_phi, landmarks=landmarks_of(cohort.table, idx, cohort.img_size),
                          seed=outcome.config.seed)
