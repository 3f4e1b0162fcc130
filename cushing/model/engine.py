"""The training engine: the paper's protocol, built for speed. Returns values; logs nothing.

Fine-tuning keeps uint8 images and their augmentation on the device, runs bf16 autocast and channels_last (CNNs) on
CUDA, syncs with the host once per epoch and can torch.compile the model (`compile`: static shapes, code cached on
disk). Frozen backbones: features of every image (and of `aug_views` augmented views per training image) are
computed once and the head alone trains on them.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from cushing import stops
from cushing.data.bank import ImageBank
from cushing.devices import autocast_for
from cushing.model.augment import DeviceAugment
from cushing.stats.metrics import lower_is_better, point_metrics

__all__ = ["FitSettings", "FitResult", "EpochCallback", "StopTraining", "fit", "predict_proba", "oversampled",
           "compiled_forward", "FitState", "CheckpointCallback", "proba_of_logits"]


class StopTraining(Exception):
    """Raised by an epoch callback to end training early (e.g. an Optuna pruner); carries the reason."""


@dataclass(frozen=True)
class FitSettings:
    epochs: int
    batch_size: int
    lr: float
    momentum: float
    weight_decay: float
    oversample: int
    aug_strength: float
    aug_views: int
    seed: int
    frozen: bool
    select_metric: str = "val/f1"
    patience: int = 0
    eval_batch: int = 128
    progress: bool = True
    desc: str = "train"
    compile: str = "none"  # torch.compile mode for fine-tuning; "none" runs eager
    checkpoint_every: int = 0  # hand a FitState to on_checkpoint every N epochs (0 = never) ...
    checkpoint_seconds: float = 0.0  # ... once at least this much wall time passed since the last one (or the start)


@dataclass
class FitState:
    """Everything needed to continue a fit after `epoch` exactly as if it had not stopped: weights, optimizer
    buffers, the random streams, the best-epoch selection and snapshot, history and timings. Plain tensors, numbers
    and lists: torch.load(weights_only=True) reads it."""

    epoch: int
    module: dict[str, torch.Tensor]
    optimizer: dict
    generator: torch.Tensor
    cpu_rng: torch.Tensor
    selector: list[float]  # best (signed), best epoch, best epoch's validation loss
    best: list[torch.Tensor]
    history: list[dict[str, float]]
    epoch_seconds: list[float]
    cuda_rng: list[torch.Tensor] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, d: dict) -> "FitState":
        return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d})


EpochCallback = Callable[[int, dict[str, float]], None]  # (epoch, that epoch's metrics)
CheckpointCallback = Callable[[FitState], None]


@dataclass
class FitResult:
    best_epoch: int
    best_score: float
    history: list[dict[str, float]]
    epochs_run: int
    seconds: float
    stopped: str = ""  # why training ended early, if it did
    epoch_seconds: list[float] = field(default_factory=list)
    # the best epoch's validation logits [n_val, 2] (eager fine-tuning): exactly what scoring the validation split
    # with the restored weights would compute again; None when not kept (frozen, compiled, best epoch before resume)
    val_logits: torch.Tensor | None = None


def oversampled(labels: np.ndarray, factor: int) -> np.ndarray:
    """Positions into `labels` where each minority-class item appears `factor` times (train only)."""
    labels = np.asarray(labels)
    minority = 1 if (labels == 1).sum() <= (labels == 0).sum() else 0
    pos = np.arange(len(labels))
    return np.concatenate([pos] + [pos[labels == minority]] * (max(1, factor) - 1))


def _batches(n: int, bs: int) -> list[tuple[int, int]]:
    """Batch bounds that never leave a batch of one (BatchNorm cannot train on it)."""
    bounds = [(i, min(i + bs, n)) for i in range(0, n, bs)]
    if len(bounds) > 1 and bounds[-1][1] - bounds[-1][0] == 1:
        bounds[-2:] = [(bounds[-2][0], n)]
    return bounds


@torch.no_grad()
def _outputs(forward, bank: ImageBank, idx: torch.Tensor, prep: Callable, batch: int,
             step_begin: Callable[[], None] = lambda: None) -> torch.Tensor:
    """forward(prep(images at `idx`)) batch by batch, as float32 copies (a CUDA-graph replay for the next batch may
    reuse an output's memory); a safe point between batches."""
    out = []
    for a, b in _batches(len(idx), batch):
        stops.check()
        step_begin()
        with autocast_for(bank.device):
            out.append(forward(prep(bank.take(idx[a:b]))).float().clone())
    return torch.cat(out) if out else torch.zeros((0, 2), device=bank.device)


def predict_proba(model, bank: ImageBank, idx: np.ndarray, aug: DeviceAugment, batch: int = 128
                  ) -> tuple[np.ndarray, np.ndarray]:
    """(probability of class 1, logit difference) for the images at `idx`; eval mode, no augmentation."""
    model.eval()
    t_idx = torch.as_tensor(np.asarray(idx), dtype=torch.long, device=bank.device)
    return proba_of_logits(_outputs(model, bank, t_idx, aug.normalize, batch))


def proba_of_logits(logits: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(probability of class 1, logit difference) from [n, 2] logits: what `predict_proba` returns."""
    logits = logits.float()
    return (logits.softmax(1)[:, 1].cpu().numpy().astype(np.float64),
            (logits[:, 1] - logits[:, 0]).cpu().numpy().astype(np.float64))


def _epoch_metrics(y_val: np.ndarray, logits: torch.Tensor, loss_sum: torch.Tensor, n_train: int) -> dict[str, float]:
    """Validation metrics and the mean training loss, from one device-to-host copy (one sync per epoch)."""
    packed = torch.cat([logits.float().reshape(-1), loss_sum.float().reshape(1)]).cpu().numpy().astype(np.float64)
    z, y = packed[:-1].reshape(-1, 2), np.asarray(y_val, int)
    loss = float(np.mean(np.logaddexp(z[:, 0], z[:, 1]) - z[np.arange(len(z)), y])) if len(y) else float("nan")
    m = point_metrics(y_val, 1.0 / (1.0 + np.exp(z[:, 0] - z[:, 1])), 0.5)
    shown = ("f1", "auc", "accuracy", "recall", "specificity", "precision")
    return {"val/loss": loss, **{f"val/{k}": m[k] for k in shown}, "train/loss": float(packed[-1]) / max(1, n_train)}


class _Selector:
    """Tracks the best epoch on a validation metric, in the metric's direction (`lower_is_better`)."""

    def __init__(self, metric: str):
        self.metric = metric
        self.sign = -1.0 if lower_is_better(metric) else 1.0
        self.best, self.best_epoch, self.best_loss = -math.inf, 0, math.inf

    def value(self) -> float:
        """The best epoch's value of the metric (per epoch: at argmax), in the metric's own units."""
        return self.sign * self.best if math.isfinite(self.best) else float("nan")

    def update(self, epoch: int, metrics: dict[str, float]) -> bool:
        if self.metric not in metrics:
            raise KeyError(f"select_metric {self.metric!r} is not computed per epoch; choose one of {sorted(metrics)}")
        v = metrics[self.metric]
        score = self.sign * v if math.isfinite(v) else -math.inf
        loss = metrics.get("val/loss", math.inf)
        # ties (common with small validation sets) go to the lower validation loss
        if score > self.best or (score == self.best and loss < self.best_loss) or self.best_epoch == 0:
            self.best, self.best_epoch, self.best_loss = score, epoch, loss
            return True
        return False


def fit(model, bank: ImageBank, labels: np.ndarray, train_idx: np.ndarray, val_idx: np.ndarray,
        aug: DeviceAugment, s: FitSettings, on_epoch: EpochCallback | None = None, *,
        resume: FitState | None = None, on_checkpoint: CheckpointCallback | None = None) -> FitResult:
    """Train `model` in place; on return it holds the weights of the best validation epoch. With `resume` (a
    FitState handed to `on_checkpoint` earlier) training continues after that epoch; on the CPU the result equals
    that of a fit that never stopped."""
    torch.manual_seed(s.seed)
    gen = torch.Generator(device=bank.device).manual_seed(s.seed)
    ckpt = _Checkpoints(resume, on_checkpoint, s.checkpoint_every, s.checkpoint_seconds)
    split = np.asarray(labels), np.asarray(train_idx), np.asarray(val_idx)
    return (_fit_head if s.frozen else _fit_full)(model, bank, *split, aug, s, gen, on_epoch, ckpt)


def _to_cpu(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu().clone()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


@dataclass
class _Checkpoints:
    """Where a fit starts (a FitState to continue from) and where its periodic states go."""

    resume: FitState | None
    callback: CheckpointCallback | None
    every: int
    seconds: float = 0.0  # the time floor: a checkpoint costs a device-to-host copy and a write of ~3x the weights
    since: float = field(default_factory=time.perf_counter)

    def due(self, epoch: int, last: int, stopping: bool = False) -> bool:
        """A periodic checkpoint; or, when a stop was asked, one at this epoch's end whatever the period."""
        if not (self.callback and self.every and epoch < last):
            return False
        return stopping or (epoch % self.every == 0 and time.perf_counter() - self.since >= self.seconds)

    def capture(self, epoch: int, module, opt, gen, sel: "_Selector", snap: "_Snapshot", history: list,
                times: list) -> FitState:
        self.since = time.perf_counter()
        return FitState(epoch, _to_cpu(module.state_dict()), _to_cpu(opt.state_dict()), gen.get_state(),
                        torch.get_rng_state(), [sel.best, sel.best_epoch, sel.best_loss], _to_cpu(snap.saved or []),
                        [dict(h) for h in history], list(times),
                        [t.cpu() for t in torch.cuda.get_rng_state_all()] if gen.device.type == "cuda" else [])

    def restore(self, module, opt, gen, sel: "_Selector", snap: "_Snapshot") -> tuple[int, list, list]:
        """Put the saved state back; returns (first epoch to run, history, epoch times)."""
        r = self.resume
        if r is None:
            return 1, [], []
        module.load_state_dict(r.module)
        opt.load_state_dict(r.optimizer)
        gen.set_state(r.generator)
        torch.set_rng_state(r.cpu_rng)
        if r.cuda_rng and gen.device.type == "cuda":
            torch.cuda.set_rng_state_all(r.cuda_rng)
        sel.best, sel.best_epoch, sel.best_loss = float(r.selector[0]), int(r.selector[1]), float(r.selector[2])
        device = next(iter(module.state_dict().values())).device
        snap.saved = [t.to(device) for t in r.best] or None
        return r.epoch + 1, [dict(h) for h in r.history], list(r.epoch_seconds)


def _optimizer(params, s: FitSettings, device: torch.device):
    kw = {"fused": True} if device.type == "cuda" else {"foreach": True}
    return torch.optim.SGD(params, lr=s.lr, momentum=s.momentum, weight_decay=s.weight_decay, **kw)


class _Snapshot:
    """The best epoch's weights, kept on the device: buffers allocated once, refreshed with one foreach copy."""

    def __init__(self, module: torch.nn.Module, keep: Callable[[], torch.Tensor | None] = lambda: None):
        self.module, self.saved, self.kept = module, None, None
        self.keep = keep  # what else the best epoch leaves behind (its validation logits), taken with the weights

    def _live(self) -> list[torch.Tensor]:
        return [t.detach() for t in self.module.state_dict().values()]

    def take(self) -> None:
        self.kept = self.keep()
        live = self._live()
        if self.saved is None:
            self.saved = [t.clone() for t in live]
        else:
            torch._foreach_copy_(self.saved, live)

    def restore(self) -> None:
        if self.saved is not None:
            with torch.no_grad():
                torch._foreach_copy_(self._live(), self.saved)


def _loop(s: FitSettings, run_epoch: Callable[[int], dict[str, float]], snap: _Snapshot,
          on_epoch: EpochCallback | None, ckpt: _Checkpoints, opt, gen) -> FitResult:
    """The epoch loop shared by both paths: selection, patience, callbacks, checkpoints, progress, timing."""
    sel = _Selector(s.select_metric)
    start, history, times = ckpt.restore(snap.module, opt, gen, sel, snap)
    stopped = ""
    t0 = time.perf_counter()
    with tqdm(total=s.epochs, initial=start - 1, desc=s.desc, unit="ep", disable=not s.progress, leave=False,
              mininterval=0.5) as bar:
        for epoch in range(start, s.epochs + 1):
            te = time.perf_counter()
            metrics = run_epoch(epoch)
            times.append(time.perf_counter() - te)
            history.append({"epoch": epoch, **metrics})
            if sel.update(epoch, metrics):
                snap.take()
            bar.set_postfix_str(f"{s.select_metric} {metrics[s.select_metric]:.3f} | best "
                                f"{sel.value():.3f} @ epoch {sel.best_epoch}", refresh=False)
            bar.update(1)
            if on_epoch is not None:
                try:
                    on_epoch(epoch, metrics)
                except StopTraining as e:
                    stopped = str(e) or "stopped by callback"
                    break
            if s.patience and epoch - sel.best_epoch >= s.patience:
                stopped = f"no improvement in {s.patience} epochs"
                break
            if ckpt.due(epoch, s.epochs, stopping=stops.requested() is not None):
                ckpt.callback(ckpt.capture(epoch, snap.module, opt, gen, sel, snap, history, times))
            stops.check()  # at an epoch's end, after its checkpoint
    snap.restore()
    return FitResult(sel.best_epoch, sel.value(), history, len(history), time.perf_counter() - t0, stopped, times,
                     snap.kept)


def compiled_forward(model: torch.nn.Module, mode: str):
    """(forward callable, step marker): the model itself, or torch.compile of it with static shapes. Inductor's disk
    caches live in TORCHINDUCTOR_CACHE_DIR (the CLI sets it at start-up: `cache_home()/inductor` unless set, e.g. to
    a folder a sweep's hosts share), so the second training of an architecture (a rerun, tuning trials, folds,
    seeds) skips most of the compile. The step marker tells CUDA-graph trees that a new iteration begins."""
    if mode == "none":
        return model, lambda: None
    return torch.compile(model, mode=mode, dynamic=False), torch.compiler.cudagraph_mark_step_begin


def _sgd_pass(opt, n: int, batch_size: int, loss_of: Callable[[int, int], torch.Tensor], device) -> torch.Tensor:
    """SGD steps over items [0, n) of an epoch's order, batch by batch; the summed loss, left on the device."""
    loss_sum = torch.zeros((), device=device)
    for a, b in _batches(n, batch_size):
        stops.check()  # a stop is answered within one batch
        loss = loss_of(a, b)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        loss_sum += loss.detach() * (b - a)
    return loss_sum


def _fit_full(model, bank, labels, train_idx, val_idx, aug, s, gen, on_epoch, ckpt: _Checkpoints) -> FitResult:
    dev = bank.device
    forward, step_begin = compiled_forward(model, s.compile)
    y_all = torch.tensor(labels, dtype=torch.long, device=dev)  # a copy: labels may be a read-only view
    epoch_pos = torch.as_tensor(train_idx[oversampled(labels[train_idx], s.oversample)], device=dev)
    val_t = torch.as_tensor(val_idx, dtype=torch.long, device=dev)
    opt = _optimizer([p for p in model.parameters() if p.requires_grad], s, dev)
    last: dict[str, torch.Tensor] = {}

    def run_epoch(epoch: int) -> dict[str, float]:
        model.train()
        order = epoch_pos[torch.randperm(len(epoch_pos), device=dev, generator=gen)]

        def loss_of(a: int, b: int) -> torch.Tensor:
            x = aug(bank.take(order[a:b]), gen)
            step_begin()
            with autocast_for(dev):
                return F.cross_entropy(forward(x), y_all[order[a:b]])
        loss_sum = _sgd_pass(opt, len(order), s.batch_size, loss_of, dev)
        model.eval()
        last["val_logits"] = _outputs(forward, bank, val_t, aug.normalize, s.eval_batch, step_begin)
        return _epoch_metrics(labels[val_idx], last["val_logits"], loss_sum, len(epoch_pos))

    # eager: the validation pass is the forward that scoring would repeat (same weights, batches and precision)
    keep = (lambda: last.get("val_logits")) if s.compile == "none" else (lambda: None)
    try:
        return _loop(s, run_epoch, _Snapshot(model, keep), on_epoch, ckpt, opt, gen)
    finally:
        # in-process compiled code and CUDA-graph pools go, so the next model in a sweep neither inherits memory nor
        # hits dynamo's recompile limit (the disk cache keeps its compile warm)
        if s.compile != "none":
            torch.compiler.reset()


def _feature_bank(model, bank, idx: np.ndarray, aug: DeviceAugment, views: int, gen, batch: int) -> torch.Tensor:
    """[views, N, D] pre-logit features: `views` augmented views of the images, or (views=1) the plain images."""
    model.eval()
    prep = (lambda x: aug(x, gen)) if views > 1 else aug.normalize
    t_idx = torch.as_tensor(idx, dtype=torch.long, device=bank.device)
    return torch.stack([_outputs(lambda x: model.forward_head(model.forward_features(x), pre_logits=True), bank,
                                 t_idx, prep, batch) for _ in range(views)])


def _fit_head(model, bank, labels, train_idx, val_idx, aug, s, gen, on_epoch, ckpt: _Checkpoints) -> FitResult:
    dev = bank.device
    views = max(2, s.aug_views) if s.aug_strength > 0 else 1
    train_feats = _feature_bank(model, bank, train_idx, aug, views, gen, s.eval_batch)
    val_feats = _feature_bank(model, bank, val_idx, aug, 1, gen, s.eval_batch)[0]
    head = copy.deepcopy(model.get_classifier()).float().train()
    opt = _optimizer(list(head.parameters()), s, dev)
    y_tr = torch.as_tensor(labels[train_idx], dtype=torch.long, device=dev)
    epoch_pos = torch.as_tensor(oversampled(labels[train_idx], s.oversample), device=dev)  # into train_idx

    def run_epoch(epoch: int) -> dict[str, float]:
        order = epoch_pos[torch.randperm(len(epoch_pos), device=dev, generator=gen)]
        view = torch.randint(0, views, (len(order),), device=dev, generator=gen)

        def loss_of(a: int, b: int) -> torch.Tensor:
            return F.cross_entropy(head(train_feats[view[a:b], order[a:b]]), y_tr[order[a:b]])
        loss_sum = _sgd_pass(opt, len(order), s.batch_size, loss_of, dev)
        with torch.no_grad():
            return _epoch_metrics(labels[val_idx], head(val_feats), loss_sum, len(epoch_pos))

    result = _loop(s, run_epoch, _Snapshot(head), on_epoch, ckpt, opt, gen)
    target = model.get_classifier()
    target.load_state_dict({k: v.to(next(target.parameters()).dtype) for k, v in head.state_dict().items()})
    return result
