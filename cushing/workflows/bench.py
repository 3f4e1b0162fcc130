"""`cushing bench`: the engine's paper-shaped epoch against the compute floor, per backbone; faces (whole runs:
`bench_run`).

Paper shape (Table I): 115 training subjects with 17 patients -> 183 images per epoch after x5 oversampling, batch
32, plus a 114-image validation pass, with random weights (speed does not depend on them). The engine's epoch
includes augmentation, the validation pass, metrics and the one host sync per epoch; the floor is the same work as
pure compute on static device tensors.
"""
from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from cushing.data.bank import ImageBank
from cushing.data.demo import make_demo_cohort
from cushing.devices import autocast_for, device_name, pick_device, training_device
from cushing.faces.pipeline import extract_faces
from cushing.faces.settings import FaceSettings
from cushing.model.augment import DeviceAugment
from cushing.model.backbones import build_model, get_spec, preprocess_of
from cushing.model.engine import FitSettings, _batches, fit, oversampled

__all__ = ["run_bench", "BenchRow", "paper_shaped_labels", "bench_faces"]

N_TRAIN, N_TRAIN_POS, N_VAL = 115, 17, 114


@dataclass
class BenchRow:
    model: str
    frozen: bool
    epoch_s: float  # median engine epoch (fine-tune) or per-epoch share of the whole frozen run
    floor_s: float  # the same batches (183 = 5 x 32 + 23) and validation pass, as pure compute on static tensors
    ratio: float
    floor_anchor_s: float  # gpu_anchor.py's formula: 183/32 full steps + 114/128 of a 128-image forward
    ratio_anchor: float
    total_s: float  # frozen: features + all head epochs; fine-tune: timed epochs
    images_per_epoch: int
    note: str = ""
    compile: str = "none"
    first_epoch_s: float = float("nan")  # fine-tune: the first epoch, with cuDNN autotuning and any compile


def paper_shaped_labels(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    tr = np.r_[np.ones(N_TRAIN_POS, int), np.zeros(N_TRAIN - N_TRAIN_POS, int)]
    va = np.r_[np.ones(16, int), np.zeros(N_VAL - 16, int)]
    return np.r_[rng.permutation(tr), rng.permutation(va)]


def _timed(fn, reps: int, dev: torch.device) -> float:
    """Median seconds of `reps` calls, each timed between two device syncs."""
    sync = torch.cuda.synchronize if dev.type == "cuda" else lambda: None
    ts = []
    for _ in range(reps):
        sync()
        t = time.perf_counter()
        fn()
        sync()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def compute_floor(model, spec, dev: torch.device, img: int, bs: int, n_train: int, n_val: int) -> tuple[float, float]:
    """(exact, anchor) seconds of pure compute. exact: the epoch's own batches (the last of 183 is 23 images) and the
    validation forward in batches of 128; anchor: ../shared/bench/gpu_anchor.py's formula, n_train/bs full steps
    plus n_val/128 of a 128-image forward."""
    fmt = torch.channels_last if spec.channels_last and dev.type == "cuda" else torch.contiguous_format
    x = torch.randn(max(bs, 128), 3, img, img, device=dev).contiguous(memory_format=fmt)
    y = torch.randint(0, 2, (len(x),), device=dev)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3, momentum=0.9,
                          **({"fused": True} if dev.type == "cuda" else {}))
    sizes = [b - a for a, b in _batches(n_train, bs)]
    val = min(128, n_val)

    def step(k: int) -> None:
        with autocast_for(dev):
            loss = F.cross_entropy(model(x[:k]), y[:k])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    @torch.no_grad()
    def forward(n: int) -> None:
        for a in range(0, n, 128):
            with autocast_for(dev):
                model(x[:min(128, n - a)])
    cuda = dev.type == "cuda"
    model.train()
    if cuda:  # warm-up, one step per shape: cuDNN autotuning (a CPU has none)
        for k in {*sizes, bs}:
            step(k)
    reps, n = (5, 10) if cuda else (1, 1)
    t_step = _timed(lambda: [step(bs) for _ in range(n)], reps, dev) / n
    t_epoch = _timed(lambda: [step(k) for k in sizes], reps, dev) if sizes else 0.0
    model.eval()
    if cuda:
        forward(n_val)
        forward(val)
    t_val, t_fwd = _timed(lambda: forward(n_val), reps, dev), _timed(lambda: forward(val), reps, dev)
    return t_epoch + t_val, n_train / bs * t_step + n_val / val * t_fwd


def bench_one(name: str, frozen: bool, *, dev: torch.device, img: int, epochs: int, head_epochs: int = 200,
              compile: str = "none") -> BenchRow:
    spec = get_spec(name)
    labels = paper_shaped_labels()
    tr, va = np.arange(N_TRAIN), np.arange(N_TRAIN, N_TRAIN + N_VAL)
    n_epoch = len(oversampled(labels[tr], 5))
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (len(labels), 3, img, img), dtype=torch.uint8, generator=g)
    model = build_model(name, pretrained=False, img_size=img, freeze=frozen).to(dev)
    if spec.channels_last and dev.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    bank = ImageBank(images, dev, 8 * 2**30)
    aug = DeviceAugment(preprocess_of(model, img), dev, 1.0, spec.channels_last and dev.type == "cuda")
    warm = 2 if dev.type == "cuda" else 1  # epochs left out of the median: cuDNN autotuning, lazy CUDA init
    s = FitSettings(epochs=(head_epochs if frozen else epochs + warm), batch_size=32, lr=1e-3, momentum=0.9,
                    weight_decay=0.0, oversample=5, aug_strength=1.0, aug_views=8, seed=0, frozen=frozen,
                    progress=False, desc=name, compile="none" if frozen else compile)
    if frozen:
        if dev.type == "cuda":  # warm-up: cuDNN autotuning, lazy CUDA init (a CPU has neither)
            fit(model, bank, labels, tr, va, aug, replace(s, epochs=2))
        total = _timed(lambda: fit(model, bank, labels, tr, va, aug, s), 1, dev)
        floor, _ = compute_floor(model, spec, dev, img, 32, 0, len(labels) + 7 * N_TRAIN)
        return BenchRow(name, True, total / head_epochs, floor / head_epochs, total / max(floor, 1e-9),
                        floor / head_epochs, total / max(floor, 1e-9), total, n_epoch,
                        f"features once (8 views/train image) + {head_epochs} head epochs; "
                        f"floor = one forward of every image and view")
    result = fit(model, bank, labels, tr, va, aug, s)
    epoch_s = statistics.median(result.epoch_seconds[warm:])
    floor, anchor = compute_floor(model, spec, dev, img, 32, n_epoch, N_VAL)
    return BenchRow(name, False, epoch_s, floor, epoch_s / floor, anchor, epoch_s / anchor,
                    sum(result.epoch_seconds[warm:]), n_epoch, compile=compile,
                    first_epoch_s=result.epoch_seconds[0])


def run_bench(*, models: list[str], frozen: list[str], epochs: int = 6, img_size: int = 224, device: str = "auto",
              out: str = "bench.json", compile: str = "none") -> list[BenchRow]:
    dev = training_device(device)
    name = device_name(dev)
    rows = []
    plan = [(m, False) for m in models] + [(m, True) for m in frozen]
    print(f"device: {name}; {N_TRAIN} train subjects -> {len(oversampled(paper_shaped_labels()[:N_TRAIN], 5))} "
          f"images/epoch, {N_VAL} val; img {img_size}; batch 32; compile {compile} (floor: eager)")
    print(f"{'model':11s} {'mode':10s} {'epoch s':>9s} {'floor s':>9s} {'ratio':>6s} {'anchor floor':>12s} "
          f"{'ratio':>6s} {'1st epoch s':>11s}")
    for m, fr in plan:
        try:
            r = bench_one(m, fr, dev=dev, img=img_size, epochs=epochs, compile=compile)
        except Exception as e:  # one model failing must not lose the others
            nan = float("nan")
            r = BenchRow(m, fr, nan, nan, nan, nan, nan, nan, 0, f"error: {e!r}"[:300])
        rows.append(r)
        print(f"{r.model:11s} {'frozen' if r.frozen else 'fine-tune':10s} {r.epoch_s:9.4f} {r.floor_s:9.4f} "
              f"{r.ratio:6.2f} {r.floor_anchor_s:12.4f} {r.ratio_anchor:6.2f} {r.first_epoch_s:11.2f}"
              f"{'  ' + r.note if r.note.startswith('error') else ''}", flush=True)
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        # after every model: an interrupted bench keeps what it measured
        Path(out).write_text(json.dumps({"device": name, "torch": torch.__version__, "img_size": img_size,
                                         "epochs": epochs, "rows": [asdict(r) for r in rows]}, indent=1))
    print(f"wrote {out}")
    return rows


def bench_faces(*, manifest: str | None, limit: int, sam_checkpoint: str | None, out: str) -> dict:
    """Photos per second cold (empty cache) and warm (everything cached), printed and written as JSON."""
    with tempfile.TemporaryDirectory() as tmp:
        # default: the 343 demo-cohort faces at 448 px as stand-in photos (dlib finds about half of these drawn
        # faces; --manifest with real photos gives real figures)
        src = Path(manifest) if manifest else make_demo_cohort(Path(tmp) / "photos", size=448)
        if limit:
            df = pd.read_csv(src).head(limit)
            df["image"] = [str((src.parent / p).resolve()) if not os.path.isabs(p) else p for p in df["image"]]
            src = Path(tmp) / "subset.csv"
            df.to_csv(src, index=False)
        s = FaceSettings(sam_checkpoint=sam_checkpoint)
        t = time.perf_counter()
        cold = extract_faces(src, Path(tmp) / "cold", s, cache_dir=Path(tmp) / "cache", progress=False,
                             skip_bad_photos=True)
        t_cold = time.perf_counter() - t
        t = time.perf_counter()
        warm = extract_faces(src, Path(tmp) / "warm", s, cache_dir=Path(tmp) / "cache", progress=False,
                             skip_bad_photos=True)
        t_warm = time.perf_counter() - t
    n = len(cold.report)
    res = {"device": device_name(pick_device("auto")), "photos": n, "extracted": cold.extracted,
           "mask": s.mask_method, "cold_s": t_cold, "warm_s": t_warm, "cold_photos_per_s": n / t_cold,
           "warm_photos_per_s": n / t_warm, "warm_speedup": t_cold / t_warm, "warm_processed": warm.processed}
    print(f"{n} photos ({cold.extracted} extracted, mask {s.mask_method}) on {res['device']}: cold {t_cold:.2f} s "
          f"({n / t_cold:.1f} photos/s), warm {t_warm:.3f} s ({n / t_warm:.0f} photos/s), {t_cold / t_warm:.0f}x")
    Path(out).write_text(json.dumps(res, indent=1))
    return res
