"""`cushing bench`: the engine's paper-shaped epoch against the compute floor, per backbone; whole runs; faces.

Paper shape (Table I): 115 training subjects with 17 patients -> 183 images per epoch after x5 oversampling, batch
32, plus a 114-image validation pass, with random weights (speed does not depend on them). The engine's epoch
includes augmentation, the validation pass, metrics and the one host sync per epoch; the floor is the same work as
pure compute on static device tensors.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from cushing import tracking
from cushing.config import TrainConfig
from cushing.data.bank import ImageBank
from cushing.data.demo import make_demo_cohort
from cushing.devices import autocast_for, device_name, pick_device, training_device
from cushing.faces.pipeline import extract_faces
from cushing.faces.settings import FaceSettings
from cushing.model.augment import DeviceAugment
from cushing.model.backbones import build_model, get_spec, preprocess_of
from cushing.model.engine import FitSettings, _batches, fit, oversampled
from cushing.model.train import prepare_cohort
from cushing.phases import OTHER, PHASES_OUT_ENV
from cushing.tracking.stores import seed_sqlite
from cushing.workflows.experiment import run_single

__all__ = ["run_bench", "BenchRow", "paper_shaped_labels", "bench_run", "bench_faces", "launch_run"]

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


LAUNCHER = "launcher (mlflow run: its imports, project, store, run; until the training process starts)"
STARTUP = "python start, imports, arguments"
EXIT = "exit (summary, interpreter teardown, launcher end)"


def bench_run(*, model: str = "resnet18", img_size: int = 112, epochs: int = 3, repeats: int = 3,
              device: str = "auto", cam: bool = True, out: str = "bench_run.json", launches: int = 1) -> list[dict]:
    """Whole runs on the demo cohort (random weights), split by the phases the run's own timer recorded.

    In process (`run_single`, as a sweep worker runs them; median of `repeats`, after one warm-up run on CUDA for
    its lazy start and cuDNN's autotuning; a CPU has neither, and the median leaves out the first run's imports):
    the per-run cost a sweep pays for each configuration. Launched (`launches` times `mlflow run . --env-manager
    local`, each on a fresh store, as a user's first run in a fresh clone): also the launcher, the process start
    and the exit.
    Logs into throwaway stores, not yours. Prints one table and writes it as JSON."""
    cfg = TrainConfig(model=model, pretrained=False, img_size=img_size, epochs=epochs, device=device, cam=cam,
                      experiment="cushing-bench")
    dev = pick_device(device)
    with tempfile.TemporaryDirectory(prefix="cushing-bench-run-") as d, \
            tracking.using_store(f"sqlite:///{d}/mlflow.db"):
        cohort = prepare_cohort(cfg, progress=False)
        if dev.type == "cuda":
            run_single(cfg, cohort=cohort, progress=False)  # warm-up
        rows = []
        for _ in range(repeats):
            t = time.perf_counter()
            summary = run_single(cfg, cohort=cohort, progress=False)
            wall = time.perf_counter() - t
            train_s = summary.metrics["train_seconds"]
            rows.append({"wall_s": wall, "train_s": train_s, "other_s": wall - train_s,
                         "phases": summary.phases.table()})
    launched = [launch_run(model=model, img_size=img_size, epochs=epochs, device=device, cam=cam)
                for _ in range(launches)]
    med = {k: statistics.median(r[k] for r in rows) for k in ("wall_s", "train_s", "other_s")}
    table = {"in_process": _median_phases([r["phases"] for r in rows]),
             "mlflow_run": _median_phases([r["phases"] for r in launched]) if launched else {}}
    name = device_name(dev)
    print(f"device: {name}; {model} at {img_size} px, {epochs} epochs, Grad-CAM {'on' if cam else 'off'}; "
          f"median of {repeats} in-process runs" + (f" and of {launches} launched (mlflow run)" if launches else ""))
    _print_phases(table)
    print(f"run {med['wall_s']:.2f} s = training loop {med['train_s']:.2f} s + the rest {med['other_s']:.2f} s "
          f"(rest/loop {med['other_s'] / med['train_s']:.2f}; in process, as a sweep runs each configuration)")
    lmed = {}
    if launched:
        lmed = {k: statistics.median(r[k] for r in launched) for k in ("wall_s", "train_s")}
        print(f"mlflow run {lmed['wall_s']:.2f} s = {lmed['wall_s'] / lmed['train_s']:.2f} x the training loop "
              f"({lmed['train_s']:.2f} s): launcher to exit, on a fresh store")
    Path(out).write_text(json.dumps({"device": name, "model": model, "img_size": img_size, "epochs": epochs, "cam": cam,
                                     "median": med, "runs": rows, "phases": table,
                                     "mlflow_run": {"median": lmed, "runs": launched}}, indent=1))
    return rows


def launch_run(*, model: str, img_size: int, epochs: int, device: str = "auto", cam: bool = True) -> dict:
    """One `mlflow run . --env-manager local` of the main entry point on a fresh throwaway store (seeded as
    scripts/quickstart.sh seeds one), split into the launcher, the training process's start, the phases the run
    recorded itself (CUSHING_PHASES_OUT) and the exit."""
    root = Path(__file__).resolve().parents[2]
    if not (root / "MLproject").exists():
        raise FileNotFoundError(f"no MLproject beside the package ({root}): launched runs need the project's clone")
    with tempfile.TemporaryDirectory(prefix="cushing-bench-launch-") as d:
        report, store = Path(d) / "phases.json", f"sqlite:///{d}/mlflow.db"
        seed_sqlite(store)  # as scripts/quickstart.sh does before its `mlflow run`
        env = {**os.environ, "MLFLOW_TRACKING_URI": store, PHASES_OUT_ENV: str(report)}
        for k in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME"):
            env.pop(k, None)
        params = {"model": model, "pretrained": "false", "epochs": epochs, "img_size": img_size, "device": device,
                  "cam": str(cam).lower(), "experiment": "cushing-bench"}
        mlflow = Path(sys.executable).with_name("mlflow")  # the `mlflow` a user types, from this environment
        cmd = [*([str(mlflow)] if mlflow.exists() else [sys.executable, "-m", "mlflow"]), "run", str(root),
               "--env-manager", "local", "--experiment-name", "cushing-bench",
               *[a for k, v in params.items() for a in ("-P", f"{k}={v}")]]
        t0 = time.time()
        r = subprocess.run(cmd, cwd=d, env=env, capture_output=True, text=True)
        t1 = time.time()
        if r.returncode != 0 or not report.exists():
            raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stderr[-3000:]}")
        run = json.loads(report.read_text())
    started = run["process_start"] or run["start"]
    phases = {LAUNCHER: started - t0, STARTUP: run["start"] - started, **run["phases"], EXIT: t1 - run["end"]}
    return {"wall_s": t1 - t0, "train_s": run["train_seconds"], "phases": phases}


def _median_phases(tables: list[dict[str, float]]) -> dict[str, float]:
    names = list(dict.fromkeys(n for t in tables for n in t))
    order = [n for n in names if n != OTHER] + [OTHER] * (OTHER in names)
    return {n: statistics.median(t.get(n, 0.0) for t in tables) for n in order}


def _print_phases(table: dict[str, dict[str, float]]) -> None:
    cols = [c for c in ("mlflow_run", "in_process") if table.get(c)]
    order = list(dict.fromkeys(n for c in cols for n in table[c] if n != OTHER)) + [OTHER]
    totals = {c: sum(table[c].values()) for c in cols}
    heads = {"mlflow_run": "mlflow run", "in_process": "in process"}
    print(f"{'phase':76s}" + "".join(f"{heads[c]:>20s}" for c in cols))
    for n in order + ["total"]:
        cells = []
        for c in cols:
            v = totals[c] if n == "total" else table[c].get(n)
            cells.append(f"{'-':>20s}" if v is None else f"{v:9.2f} s {100 * v / totals[c]:6.1f}%  ")
        print(f"{n[:76]:76s}" + "".join(cells))


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
