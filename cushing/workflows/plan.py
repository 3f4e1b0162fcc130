"""Roughly how long a sweep takes on one GPU, before it runs (`cushing sweep FILE --plan`). A configuration is three
phases: compile (CPU, only with `compile`), training (GPU), and the run's work outside the training loop (CPU:
logging, model build, scoring, bootstrap, tables, plots, Grad-CAM, upload), which overlaps other workers' training.
Training seconds are runs x epochs x epoch cost x (img_size / 224)^2 / compile speedup, with H200 figures from the
tables below, runs = the CV folds (else the seeds), and a frozen backbone counting FROZEN_EPOCH_EQUIV epochs (features
once, then the head). Concurrent trainings share the GPU as measured in
../shared/bench/gpu_ceiling_h200_2026-11-26.json (GPU_SHARING); CPU phases run in parallel. On another GPU the seconds
scale; compare with a measured sweep.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from cushing.model.backbones import get_spec
from cushing.config import TrainConfig

__all__ = ["Estimate", "estimate", "makespan", "RUN_OVERHEAD_S", "EPOCH_COST_S", "COMPILE_EFFECT",
           "Overhead", "overhead_from_bench", "default_overhead"]

# Seconds of one paper-shaped fine-tuning epoch (183 training images at batch 32 + 114 validation images, 224 px,
# bf16) on an NVIDIA H200. Measured by `cushing bench` (README, Benchmarks): the densenets (run 1), resnet18/50,
# vit_b_16/32, swin_b, dinov2_s/b (run 3). The others estimated by hand from measured family members and FLOPs,
# keeping the 20 near run 1's measured sum (5.53 s; these add to 5.19 s).
EPOCH_COST_S: dict[str, float] = {
    "densenet121": 0.29, "densenet161": 0.42, "densenet169": 0.46, "densenet201": 0.59, "resnet18": 0.047,
    "resnet34": 0.07, "resnet50": 0.086, "resnet101": 0.15, "resnet152": 0.22, "vit_b_16": 0.106, "vit_b_32": 0.103,
    "vit_l_16": 0.30, "vit_l_32": 0.20, "swin_t": 0.20, "swin_s": 0.33, "swin_b": 0.366, "swin_l": 0.60,
    "dinov2_s": 0.108, "dinov2_b": 0.147, "dinov2_l": 0.40}
# torch.compile(mode="reduce-overhead") on an H200 at batch 32, per backbone family: (step speedup, cold compile
# seconds), from ../shared/bench/gpu_ceiling_h200_2026-11-26.json (resnet50, densenet121, swin_b, vit_b_16 measured;
# DINOv2 taken as ViT).
COMPILE_EFFECT: dict[str, tuple[float, float]] = {"resnet": (3.7, 41.0), "densenet": (4.3, 138.0),
                                                  "swin": (3.3, 79.0), "vit": (1.5, 19.0), "dinov2": (1.5, 19.0)}
# Per run outside training: 14 s measured on the ViT-B/32 paper run (H200, README), less the ~2 s per run of MLflow
# async-queue waits that the run logger's own epoch writer removed (measured on CPU: 8.75 -> 6.6 s per short run).
RUN_OVERHEAD_S = 12.0
FROZEN_EPOCH_EQUIV = 7.0  # frozen DINOv2: features once + 200 head epochs took about 7 fine-tuning epochs (bench)
GPU_SHARING = {1: 1.0, 2: 1.5, 3: 1.55, 4: 1.6}  # total throughput of k trainings on one GPU vs one


@dataclass(frozen=True)
class Estimate:
    compile_s: float  # cold torch.compile (CPU), 0 when eager
    gpu_s: float  # training loop, alone on the GPU
    overhead_s: float  # the run's work outside the training loop on its worker (CPU)

    @property
    def total_s(self) -> float:
        return self.compile_s + self.gpu_s + self.overhead_s


@dataclass(frozen=True)
class Overhead:
    """Seconds per run outside the training loop, and whence."""

    worker_s: float
    source: str


def default_overhead() -> Overhead:
    return Overhead(RUN_OVERHEAD_S, f"{RUN_OVERHEAD_S:.0f} s per run (H200 ViT-B/32 run)")


def overhead_from_bench(path: str | Path) -> Overhead:
    """The per-run figure a `cushing bench run --out FILE` measured (its in-process phase table, median runs):
    everything outside the training loop."""
    try:
        data = json.loads(Path(path).read_text())
        table = data["phases"]["in_process"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: not the JSON of `cushing bench run --out FILE` ({type(e).__name__}: {e})") from None
    rest = sum(float(v) for k, v in table.items() if k != "training loop")
    run = f"{data.get('device', '?')}, {data.get('model', '?')} at {data.get('img_size', '?')} px"
    return Overhead(rest, f"measured by `cushing bench run` in {path} ({run})")


def estimate(cfg: TrainConfig, overhead: Overhead | None = None) -> Estimate:
    """Approximate seconds of one configuration on an H200 (cold compile cache when compiling)."""
    o = overhead or default_overhead()
    family = get_spec(cfg.model).family
    runs = cfg.cv_folds if cfg.cv_folds > 1 else cfg.seeds  # as experiment.run_experiment dispatches
    per_epoch = EPOCH_COST_S[cfg.model] * (cfg.img_size / 224) ** 2
    if cfg.frozen:
        return Estimate(0.0, runs * FROZEN_EPOCH_EQUIV * per_epoch, runs * o.worker_s)
    speedup, compile_s = COMPILE_EFFECT[family] if cfg.compile != "none" else (1.0, 0.0)
    return Estimate(runs * compile_s, runs * cfg.epochs * per_epoch / speedup, runs * o.worker_s)


def makespan(estimates: list[Estimate], workers: int) -> float:
    """Wall seconds for `workers` processes taking the jobs in order, all training on one GPU: k jobs in their GPU
    phase each progress at GPU_SHARING[k] / k, CPU phases at full speed. Time advances to the next phase end."""
    phases = (((False, e.compile_s), (True, e.gpu_s), (False, e.overhead_s)) for e in estimates)
    queue = [job for job in ([[gpu, s] for gpu, s in p if s > 1e-9] for p in phases) if job]
    running: list[list[list]] = []  # per job: its phases left, [on the GPU, seconds at full speed]
    t = 0.0
    while queue or running:
        while queue and len(running) < max(1, workers):
            running.append(queue.pop(0))
        k = sum(job[0][0] for job in running)
        rates = [GPU_SHARING.get(k, GPU_SHARING[max(GPU_SHARING)]) / k if job[0][0] else 1.0 for job in running]
        dt = min(job[0][1] / r for job, r in zip(running, rates))
        t += dt
        for job, r in zip(running, rates):
            job[0][1] -= dt * r
            if job[0][1] <= 1e-9:
                job.pop(0)
        running = [job for job in running if job]
    return t
