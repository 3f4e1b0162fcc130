"""The training engine: oversampling, best-epoch restore, frozen-feature path, streaming, determinism."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from cushing.model.backbones import build_model, preprocess_of
from cushing.config import TrainConfig
from cushing.model.augment import DeviceAugment
from cushing.data.bank import ImageBank
from cushing.model.engine import FitSettings, _batches, fit, oversampled, predict_proba
from cushing.stats.metrics import point_metrics
from cushing.model.train import prepare_cohort, train


def test_oversampling_counts_minority_times_factor():
    labels = np.r_[np.zeros(98, int), np.ones(17, int)]
    idx = oversampled(labels, 5)
    assert len(idx) == 98 + 17 * 5 == 183  # the paper's epoch: about 185 images
    assert (labels[idx] == 1).sum() == 85
    assert np.array_equal(np.bincount(idx, minlength=115)[labels == 1], np.full(17, 5))


def test_batches_never_leave_a_single_image():
    for n in range(1, 100):
        b = _batches(n, 32)
        assert b[0][0] == 0 and b[-1][1] == n
        assert all(hi - lo >= 2 for lo, hi in b) or n == 1


@pytest.fixture(scope="module")
def cohort(small_demo):
    cfg = TrainConfig(data=str(small_demo), model="resnet18", pretrained=False, img_size=48, epochs=1)
    return prepare_cohort(cfg, progress=False)


def _settings(**kw):
    base = dict(epochs=4, batch_size=32, lr=0.01, momentum=0.9, weight_decay=0.0, oversample=5, aug_strength=1.0,
                aug_views=3, seed=0, frozen=False, progress=False)
    return FitSettings(**{**base, **kw})


def _setup(cohort, name="resnet18", frozen=False, budget=8 * 2**30):
    torch.manual_seed(0)
    model = build_model(name, pretrained=False, img_size=48 if name == "resnet18" else 56, freeze=frozen)
    dev = torch.device("cpu")
    return model, ImageBank(cohort.images, dev, budget), DeviceAugment(preprocess_of(model, 48), dev, 1.0)


def test_best_epoch_weights_are_restored(cohort):
    model, bank, aug = _setup(cohort)
    seen = []
    res = fit(model, bank, cohort.labels, cohort.index("train"), cohort.index("val"), aug,
              _settings(select_metric="val/auc"), on_epoch=lambda e, m: seen.append(dict(m)))
    assert [h["epoch"] for h in res.history] == [1, 2, 3, 4] and len(seen) == 4
    assert res.best_epoch == 1 + int(np.nanargmax([m["val/auc"] for m in seen]))
    prob, _ = predict_proba(model, bank, cohort.index("val"), aug)
    auc = point_metrics(cohort.labels[cohort.index("val")], prob)["auc"]
    assert auc == pytest.approx(res.history[res.best_epoch - 1]["val/auc"], abs=1e-6)
    assert all(np.isfinite(h["train/loss"]) for h in res.history)


def test_frozen_path_trains_head_on_cached_features(cohort):
    model, bank, aug = _setup(cohort, frozen=True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calls = {"n": 0}
    orig = model.forward_features

    def counting(x):
        calls["n"] += 1
        return orig(x)
    model.forward_features = counting
    fit(model, bank, cohort.labels, cohort.index("train"), cohort.index("val"), aug, _settings(epochs=2, frozen=True))
    two = calls["n"]
    calls["n"] = 0
    fit(model, bank, cohort.labels, cohort.index("train"), cohort.index("val"), aug, _settings(epochs=12, frozen=True))
    assert calls["n"] == two, "features are computed once, not per epoch"
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"fc.weight", "fc.bias"}


def test_streaming_from_host_memory_matches_resident(cohort):
    outs = []
    for budget in (8 * 2**30, 0):
        model, bank, aug = _setup(cohort, budget=budget)
        assert bank.resident == (budget > 0)
        fit(model, bank, cohort.labels, cohort.index("train"), cohort.index("val"), aug, _settings(epochs=2))
        outs.append(predict_proba(model, bank, cohort.index("val"), aug)[0])
    assert np.allclose(outs[0], outs[1], atol=1e-5)


def test_augment_is_seeded_and_strength_zero_only_normalises(cohort):
    model, bank, aug = _setup(cohort)
    x = bank.take(torch.arange(8))
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    assert torch.equal(aug(x, g1), aug(x, g2))
    assert not torch.equal(aug(x, torch.Generator().manual_seed(2)), aug.normalize(x))
    plain = DeviceAugment(aug.pre, aug.device, 0.0)
    assert torch.equal(plain(x), aug.normalize(x))
    assert x.dtype == torch.uint8  # inputs are not mutated into floats


def test_threshold_never_reads_test_labels(cohort):
    cfg = TrainConfig(data="unused", model="resnet18", pretrained=False, img_size=48, epochs=2, cam=False)
    a = train(cfg, cohort, progress=False)
    shuffled_labels = cohort.table.copy()
    te = np.flatnonzero((cohort.split == "test").to_numpy())
    rng = np.random.default_rng(0)
    shuffled_labels.loc[shuffled_labels.index[te], "label"] = rng.permutation(shuffled_labels["label"].to_numpy()[te])
    shuffled_labels.loc[shuffled_labels.index[te[:10]], "label"] = 1 - shuffled_labels["label"].to_numpy()[te[:10]]
    other = dataclasses.replace(cohort, manifest=dataclasses.replace(cohort.manifest, table=shuffled_labels))
    b = train(cfg, other, progress=False)
    assert a.threshold == b.threshold
    assert a.fit.best_epoch == b.fit.best_epoch
    assert not np.array_equal(a.predictions["label"], b.predictions["label"])  # test labels did change


def test_bench_prints_and_writes_json(tmp_path, capsys):
    import json

    from cushing.workflows.bench import run_bench

    rows = run_bench(models=["resnet18"], frozen=["dinov2_s"], epochs=1, img_size=28, device="cpu",
                     out=str(tmp_path / "bench.json"))
    data = json.loads((tmp_path / "bench.json").read_text())
    assert data["device"].startswith("cpu") and len(data["rows"]) == 2
    ft, fr = data["rows"]
    assert ft["model"] == "resnet18" and not ft["frozen"] and ft["epoch_s"] > 0 and ft["floor_s"] > 0
    assert ft["images_per_epoch"] == 183 and ft["ratio"] == ft["epoch_s"] / ft["floor_s"]
    assert ft["floor_anchor_s"] > 0 and ft["ratio_anchor"] == ft["epoch_s"] / ft["floor_anchor_s"]
    assert fr["frozen"] and fr["total_s"] > 0
    out = capsys.readouterr().out
    assert "resnet18" in out and "floor s" in out and len(rows) == 2


def _tiny_cnn():
    """A five-layer CNN: the engine's compile path is the same for any module, and Inductor compiles this in about
    half of ResNet-18's time on a small CPU."""
    from torch import nn

    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 2))


def test_compiled_training_matches_eager_and_reuses_the_disk_cache(cohort, tmp_path, monkeypatch):
    """compile=default trains through Inductor (CPU here) to the eager result; a second training of the same
    architecture after the in-process reset compiles from the on-disk cache instead of from scratch."""
    from torch._dynamo.utils import counters

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    one_shape = dict(epochs=2, batch_size=4096, eval_batch=4096)  # one train and one eval shape: two graphs
    _, bank, aug = _setup(cohort)
    split = (cohort.labels, cohort.index("train"), cohort.index("val"))
    eager = fit(_tiny_cnn(), bank, *split, aug, _settings(**one_shape))
    counters.clear()
    results = []
    for _ in range(2):
        model = _tiny_cnn()
        results.append(fit(model, bank, *split, aug, _settings(compile="default", **one_shape)))
        assert not hasattr(model, "_orig_mod") and "8.weight" in model.state_dict()  # the caller's module, trained
    assert counters["inductor"]["fxgraph_cache_miss"] >= 2, "the first training compiled its graphs with Inductor"
    assert counters["inductor"]["fxgraph_cache_hit"] >= 2, "the second training loaded them from the disk cache"
    assert any((tmp_path / "inductor").rglob("*")), "compiled code is kept on disk"
    for got in results:
        assert len(got.history) == len(eager.history) == 2
        for h_eager, h_comp in zip(eager.history, got.history):
            assert h_comp["train/loss"] == pytest.approx(h_eager["train/loss"], rel=1e-3)
            assert h_comp["val/loss"] == pytest.approx(h_eager["val/loss"], rel=1e-3)


def test_compile_mode_is_validated():
    from cushing.config import ConfigError

    with pytest.raises(ConfigError, match="compile: one of none"):
        TrainConfig(compile="fastest")
    assert TrainConfig(compile="reduce-overhead").compile == "reduce-overhead"


RUN_PHASES = {"store: tracking server check", "run start (store, experiment, tags, heartbeat)",
              "setup logging (params, splits, dataset)", "model build", "training loop", "epoch metrics flush",
              "scoring (val, test)", "intervals (bootstrap)", "model: weights and code", "model: MLflow log_model",
              "tables", "plots", "final metrics and tags", "artifact upload", "run end"}
CAM_PHASES = {"Grad-CAM maps", "Grad-CAM randomization check", "Grad-CAM aggregates (figures, regions)"}
DATA_PHASES = {"data: manifest", "data: cohort audit", "data: split", "data: decode images",
               "backbone registry: timm import, pretrained config"}


def test_bench_run_splits_whole_runs_into_training_and_the_rest(tmp_path, capsys, cushing_home, monkeypatch):
    import json

    from cushing.phases import OTHER
    from cushing.workflows.bench_run import bench_run

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mine.db'}")
    rows = bench_run(model="resnet18", img_size=32, epochs=1, repeats=1, device="cpu", cam=False,
                     out=str(tmp_path / "run.json"), launches=0)
    data = json.loads((tmp_path / "run.json").read_text())
    assert len(rows) == 1 and len(data["runs"]) == 1 and data["median"]["wall_s"] == rows[0]["wall_s"]
    for r in rows:
        assert 0 < r["train_s"] < r["wall_s"] and r["other_s"] == pytest.approx(r["wall_s"] - r["train_s"])
        # the phases the run recorded name all of its work and add up to its wall time
        assert set(r["phases"]) == RUN_PHASES | {OTHER}, "no Grad-CAM phase with cam off"
        assert all(v >= 0 for v in r["phases"].values())
        assert sum(r["phases"].values()) == pytest.approx(r["wall_s"], rel=0.02, abs=0.05)
        assert r["phases"]["training loop"] == pytest.approx(r["train_s"], rel=0.05, abs=0.05)
    assert data["phases"]["in_process"] == pytest.approx(rows[0]["phases"]) and data["phases"]["mlflow_run"] == {}
    out = capsys.readouterr().out
    assert "training loop" in out and "artifact upload" in out and "total" in out
    from cushing.workflows.plan import overhead_from_bench

    o = overhead_from_bench(tmp_path / "run.json")  # what `cushing sweep --plan --plan-from` reads
    outside = sum(rows[0]["phases"].values()) - rows[0]["phases"]["training loop"]
    assert o.worker_s == pytest.approx(outside)
    import os
    assert os.environ["MLFLOW_TRACKING_URI"].endswith("mine.db")  # restored
    assert not (tmp_path / "mine.db").exists(), "benchmark runs go to a throwaway store, not the user's"


@pytest.mark.slow
def test_a_launched_run_is_timed_from_the_launcher_to_its_exit(cushing_home, demo_manifest, monkeypatch):
    """`mlflow run` as a user types it: the launcher, the process start and the exit around the phases the run
    recorded itself, which add up to the launch's wall time."""
    from cushing.phases import OTHER
    from cushing.workflows.bench_run import EXIT, LAUNCHER, STARTUP, launch_run

    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    r = launch_run(model="resnet18", img_size=32, epochs=1, device="cpu", cam=True)
    names = set(r["phases"])
    assert names == RUN_PHASES | CAM_PHASES | DATA_PHASES | {LAUNCHER, STARTUP, EXIT, OTHER}
    assert list(r["phases"])[:2] == [LAUNCHER, STARTUP] and list(r["phases"])[-1] == EXIT
    assert all(v >= 0 for v in r["phases"].values()) and r["phases"][LAUNCHER] > 0 and r["phases"][STARTUP] > 0
    assert sum(r["phases"].values()) == pytest.approx(r["wall_s"], rel=1e-6)
    assert 0 < r["train_s"] < r["wall_s"]


def test_checkpoints_honour_the_epoch_step_and_the_time_floor(cohort):
    """Every epoch when the floor is 0; none at all within a floor longer than the run (the paper's short runs
    are not slowed by checkpoint writes); never after the last epoch (the run is done)."""
    def epochs_saved(**kw):
        model, bank, aug = _setup(cohort, frozen=True)
        saved = []
        fit(model, bank, cohort.labels, cohort.index("train"), cohort.index("val"), aug,
            _settings(epochs=5, frozen=True, **kw), on_checkpoint=lambda state: saved.append(state.epoch))
        return saved

    assert epochs_saved(checkpoint_every=1, checkpoint_seconds=0.0) == [1, 2, 3, 4]
    assert epochs_saved(checkpoint_every=2, checkpoint_seconds=0.0) == [2, 4]
    assert epochs_saved(checkpoint_every=1, checkpoint_seconds=3600.0) == []
    assert epochs_saved(checkpoint_every=0, checkpoint_seconds=0.0) == []


def test_a_failure_after_training_keeps_the_results_made_before_it(tracking, small_demo, monkeypatch):
    """Grad-CAM fails: the run ends FAILED, with the final metrics, tables and plots made before it."""
    import mlflow

    from cushing.model import explain
    from cushing.workflows.experiment import run_single

    def broken(*a, **k):
        raise RuntimeError("Grad-CAM broke")
    monkeypatch.setattr(explain, "explain_outcome", broken)
    cfg = TrainConfig(data=str(small_demo), model="resnet18", pretrained=False, img_size=32, epochs=1, bootstrap=0,
                      cam=True, log_model=False, experiment="finish-failure")
    with pytest.raises(RuntimeError, match="Grad-CAM broke"):
        run_single(cfg, progress=False)
    client = mlflow.MlflowClient()
    run = client.search_runs([client.get_experiment_by_name("finish-failure").experiment_id])[0]
    assert run.info.status == "FAILED"
    assert {"test/f1", "val/auc", "threshold", "train_seconds"} <= set(run.data.metrics)
    names = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"predictions.csv", "per_sex.csv", "history.csv", "plots"} <= names


def test_scoring_reuses_the_best_epochs_validation_pass(small_demo):
    """The best epoch's validation logits are what scoring the validation split with the restored weights
    computes again (same weights, batches, precision): kept and reused, only the test split is scored anew."""
    from cushing.model.engine import proba_of_logits
    from cushing.model.train import fit_model, score

    cfg = TrainConfig(data=str(small_demo), model="resnet18", pretrained=False, img_size=32, epochs=4, lr=0.05,
                      select_metric="val/loss", device="cpu")
    cohort = prepare_cohort(cfg, progress=False)
    for seed in range(6):  # a seed whose best epoch is not the last (which one depends on the CPU's arithmetic)
        cfg = dataclasses.replace(cfg, seed=seed)
        fitted = fit_model(cfg, cohort, progress=False)
        if fitted.fit.best_epoch < fitted.fit.epochs_run:
            break
    assert fitted.fit.best_epoch < fitted.fit.epochs_run, "the weights were restored from an earlier epoch"
    va, te = cohort.index("val"), cohort.index("test")
    again = predict_proba(fitted.model, fitted.bank, va, fitted.aug)
    kept = proba_of_logits(fitted.fit.val_logits)
    assert np.array_equal(kept[0], again[0]) and np.array_equal(kept[1], again[1])
    test = predict_proba(fitted.model, fitted.bank, te, fitted.aug)
    out = score(fitted, cohort)
    assert np.array_equal(out.predictions["probability"].to_numpy(), np.concatenate([again[0], test[0]]))
    assert fitted.bank is None, "scoring releases the device images"
    frozen = fit_model(dataclasses.replace(cfg, freeze=True, epochs=2), cohort, progress=False)
    assert frozen.fit.val_logits is None, "the head's pass on cached features is not the full model's: scored anew"
