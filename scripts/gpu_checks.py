"""GPU checks in one process: CUDA training of several backbones through the project's engine, Grad-CAM speed on the
paper's 114-image test split, SAM (ViT-H architecture, random weights) batched on the GPU, and one paper-protocol run
end to end with MLflow. Writes JSON under --out. `cushing bench` (epoch vs compute floor) runs separately.

  python scripts/gpu_checks.py --out $OUT            # on a GPU machine
  python scripts/gpu_checks.py --out /tmp/x --quick  # a CPU smoke test of the same code paths
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
import traceback
from pathlib import Path


def _sync():
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def step(results: dict, name: str):
    def wrap(fn):
        t = time.perf_counter()
        try:
            results[name] = fn()
        except Exception as e:  # one failing check must not lose the others
            results[name] = {"error": repr(e)[:500], "trace": traceback.format_exc()[-2000:]}
        results[name + "_wall_s"] = time.perf_counter() - t
        print(name, json.dumps(results[name], default=str)[:600], flush=True)
        return fn
    return wrap


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("CUSHING_HOME", tempfile.mkdtemp(prefix="cushing-home-"))
    import torch

    res: dict = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                 "torch": torch.__version__}
    quick = a.quick
    size = 64 if quick else 224

    from cushing.config import TrainConfig
    from cushing.model.train import prepare_cohort, train

    cohort_cfg = TrainConfig(model="resnet50", pretrained=False, img_size=size, cam=False)
    cohort = prepare_cohort(cohort_cfg, progress=False)

    @step(res, "cuda_training")
    def _train():
        from cushing.metrics import auc_score

        rows = {}
        plan = [("resnet50", None), ("vit_b_16", None), ("swin_b", None), ("dinov2_b", True), ("dinov2_b", False)]
        if quick:
            plan = [("resnet18", None), ("dinov2_s", True)]
        for name, freeze in plan:
            img = 56 if quick and name.startswith("dinov2") else size
            cfg = TrainConfig(model=name, freeze=freeze, pretrained=False, epochs=2 if quick else 8, img_size=img,
                              cam=False, bootstrap=0)
            co = cohort if img == size else prepare_cohort(cfg, progress=False)
            _sync()
            t = time.perf_counter()
            o = train(cfg, co, progress=False)
            _sync()
            te = o.predictions[o.predictions["split"] == "test"]
            rows[f"{name}{'-frozen' if o.frozen else ''}"] = {
                "device": o.device, "seconds": time.perf_counter() - t, "epochs": o.fit.epochs_run,
                "median_epoch_s": sorted(o.fit.epoch_seconds)[len(o.fit.epoch_seconds) // 2],
                "test_auc": auc_score(te["label"], te["probability"]), "best_epoch": o.fit.best_epoch}
        return rows

    @step(res, "gradcam_114")
    def _cam():
        from cushing.model.backbones import build_model
        from cushing.model.explain import compute_cams, randomization_check

        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        x = torch.randn(114 if not quick else 8, 3, size, size, device=dev)
        rows = {}
        for name in (["resnet50", "vit_b_32", "swin_b", "dinov2_b"] if not quick else ["resnet18"]):
            m = build_model(name, pretrained=False, img_size=size).to(dev).eval()
            compute_cams(m, name, x[:4])  # warm-up
            _sync()
            t = time.perf_counter()
            maps = compute_cams(m, name, x)
            _sync()
            cam_s = time.perf_counter() - t
            t = time.perf_counter()
            rho = randomization_check(m, name, x)
            rows[name] = {"cam_s": cam_s, "randomization_s": time.perf_counter() - t, "shape": list(maps.shape),
                          "rho": rho}
            del m
        return rows

    @step(res, "sam_batched")
    def _sam():
        import numpy as np
        from segment_anything.build_sam import _build_sam

        from cushing.data.demo import FaceTraits, draw_face
        from cushing.faces.detect import WORK
        from cushing.faces.sam import SamMasker, SamPrompt

        d = Path(tempfile.mkdtemp())
        arch = ({"encoder_embed_dim": 64, "encoder_depth": 2, "encoder_num_heads": 2, "encoder_global_attn_indexes":
                 [1]} if quick else {"encoder_embed_dim": 1280, "encoder_depth": 32, "encoder_num_heads": 16,
                                     "encoder_global_attn_indexes": [7, 15, 23, 31]})
        t = time.perf_counter()
        sam = _build_sam(checkpoint=None, **arch)
        torch.save(sam.state_dict(), d / "sam.pth")
        del sam
        build_s = time.perf_counter() - t
        t = time.perf_counter()
        masker = SamMasker(d / "sam.pth", device="auto", batch=8)
        load_s = time.perf_counter() - t
        n = 16 if quick else 343
        rng = np.random.default_rng(0)
        imgs = [np.asarray(draw_face(FaceTraits.draw(rng, i % 2, "F"), size=WORK, seed=i)) for i in range(n)]
        prompts = [SamPrompt(points=np.array([[224.0, 230.0], [224.0, 260.0], [160.0, 250.0], [288.0, 250.0]]),
                             box=np.array([90.0, 40.0, 358.0, 420.0])) for _ in range(n)]
        masker.masks(imgs[:8], prompts[:8])  # warm-up
        _sync()
        t = time.perf_counter()
        masks = masker.masks(imgs, prompts)
        _sync()
        sec = time.perf_counter() - t
        return {"model_type": masker.model_type, "photos": n, "seconds": sec, "photos_per_s": n / sec,
                "build_and_save_s": build_s, "load_s": load_s, "mean_mask_area": float(np.mean([m.mean() for m, _ in
                                                                                             masks]))}

    @step(res, "paper_protocol_run_with_mlflow")
    def _run():
        from cushing.workflows.experiment import run_single

        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tempfile.mkdtemp()}/mlflow.db"
        cfg = TrainConfig(model="resnet18" if quick else "vit_b_32", pretrained=False, epochs=2 if quick else 200,
                          img_size=size, bootstrap=500)
        t = time.perf_counter()
        s = run_single(cfg, cohort=cohort, progress=False)
        total = time.perf_counter() - t
        return {"model": cfg.model, "epochs": cfg.epochs, "total_s": total, "train_seconds":
                s.metrics.get("train_seconds"), "epoch_seconds_median": s.metrics.get("epoch_seconds_median"),
                "cam_seconds": s.metrics.get("cam/seconds"), "test_f1": s.metrics.get("test/f1"),
                "test_auc": s.metrics.get("test/auc"), "model_uri": s.model_uri}

    (out / "gpu_checks.json").write_text(json.dumps(res, indent=1, default=str))


if __name__ == "__main__":
    main()
