"""GPU checks in one process: CUDA training of several backbones through the project's engine, Grad-CAM speed on the
paper's 114-image test split, SAM (ViT-H architecture, random weights) batched on the GPU, and one paper-protocol run
end to end with MLflow. Writes JSON under --out. `cushing bench` (epoch vs compute floor) runs separately.

  python scripts/gpu_checks.py --out $OUT            # on a GPU machine
  python scripts/gpu_checks.py --out /tmp/x --quick  # the same code paths on a CPU (tests/test_gpu_scripts.py)

Exits 1 when any check recorded an error (after running the others and writing the JSON).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path


# What each check runs on a GPU (False) and with --quick (True): the smallest sizes that still take every code path
# on a CPU (28 px: a multiple of DINOv2's 14-px patch, so one decoded cohort serves every model).
# tests/test_gpu_scripts.py checks that every model named here is still in the registry.
SIZES = {
    False: {"img": 224, "epochs": 8, "cam_images": 114, "sam_batch": 8, "sam_photos": 343,
            "train": [("resnet50", None), ("vit_b_16", None), ("swin_b", None), ("dinov2_b", True),
                      ("dinov2_b", False)],
            "cam": ["resnet50", "vit_b_32", "swin_b", "dinov2_b"], "run": "vit_b_32", "run_epochs": 200,
            "bootstrap": 500},
    True: {"img": 28, "epochs": 1, "cam_images": 5, "sam_batch": 2, "sam_photos": 3,
           "train": [("resnet18", None), ("dinov2_s", True)], "cam": ["resnet18"], "run": "resnet18",
           "run_epochs": 1, "bootstrap": 50},
}
SAM_ARCH = {  # SAM ViT-H's encoder (random weights), and a tiny one for --quick
    False: {"encoder_embed_dim": 1280, "encoder_depth": 32, "encoder_num_heads": 16,
            "encoder_global_attn_indexes": [7, 15, 23, 31]},
    True: {"encoder_embed_dim": 64, "encoder_depth": 2, "encoder_num_heads": 2, "encoder_global_attn_indexes": [1]},
}


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


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--quick", action="store_true", help="CPU sizes: the same code paths in about a minute")
    return ap.parse_args(argv)


def main() -> None:
    a = parse_args()
    out = Path(a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="gpu-checks-"))
    os.environ.setdefault("CUSHING_HOME", str(work / "home"))
    import torch

    res: dict = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                 "torch": torch.__version__}
    z = SIZES[a.quick]
    size = z["img"]

    from cushing.config import TrainConfig
    from cushing.model.train import prepare_cohort, train

    cohort_cfg = TrainConfig(model="resnet50", pretrained=False, img_size=size, cam=False)
    cohort = prepare_cohort(cohort_cfg, progress=False)

    @step(res, "cuda_training")
    def _train():
        from cushing.stats.metrics import auc

        rows = {}
        for name, freeze in z["train"]:
            cfg = TrainConfig(model=name, freeze=freeze, pretrained=False, epochs=z["epochs"], img_size=size,
                              cam=False, bootstrap=0)
            _sync()
            t = time.perf_counter()
            o = train(cfg, cohort, progress=False)
            _sync()
            te = o.predictions[o.predictions["split"] == "test"]
            rows[f"{name}{'-frozen' if o.frozen else ''}"] = {
                "device": o.device, "seconds": time.perf_counter() - t, "epochs": o.fit.epochs_run,
                "median_epoch_s": sorted(o.fit.epoch_seconds)[len(o.fit.epoch_seconds) // 2],
                "test_auc": float(auc(te["label"], te["probability"])[0]), "best_epoch": o.fit.best_epoch}
        return rows

    @step(res, "gradcam_114")
    def _cam():
        from cushing.model.backbones import build_model
        from cushing.model.explain import compute_cams, randomization_check

        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        x = torch.randn(z["cam_images"], 3, size, size, device=dev)
        rows = {}
        for name in z["cam"]:
            m = build_model(name, pretrained=False, img_size=size).to(dev).eval()
            if dev.type == "cuda":
                compute_cams(m, name, x[:4])  # warm-up: lazy CUDA init, cuDNN autotuning
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

        from cushing.data.demo import FaceTraits, draw_face
        from cushing.faces.detect import WORK
        from cushing.faces.sam import SamMasker, SamPrompt, build_sam

        t = time.perf_counter()
        sam = build_sam(**SAM_ARCH[a.quick])
        torch.save(sam.state_dict(), work / "sam.pth")
        del sam
        build_s = time.perf_counter() - t
        t = time.perf_counter()
        batch, n = z["sam_batch"], z["sam_photos"]
        masker = SamMasker(work / "sam.pth", device="auto", batch=batch)
        load_s = time.perf_counter() - t
        rng = np.random.default_rng(0)
        imgs = [np.asarray(draw_face(FaceTraits.draw(rng, i % 2, "F"), size=WORK, seed=i)) for i in range(n)]
        prompts = [SamPrompt(points=np.array([[224.0, 230.0], [224.0, 260.0], [160.0, 250.0], [288.0, 250.0]]),
                             box=np.array([90.0, 40.0, 358.0, 420.0])) for _ in range(n)]
        if torch.cuda.is_available():
            masker.masks(imgs[:batch], prompts[:batch])  # warm-up: lazy CUDA init, cuDNN autotuning
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

        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{work}/mlflow.db"
        os.chdir(work)  # MLflow's artifacts (./mlruns) land here, not in the clone
        cfg = TrainConfig(model=z["run"], pretrained=False, epochs=z["run_epochs"], img_size=size,
                          bootstrap=z["bootstrap"])
        t = time.perf_counter()
        s = run_single(cfg, cohort=cohort, progress=False)
        total = time.perf_counter() - t
        return {"model": cfg.model, "epochs": cfg.epochs, "total_s": total, "train_seconds":
                s.metrics.get("train_seconds"), "epoch_seconds_median": s.metrics.get("epoch_seconds_median"),
                "cam_seconds": s.metrics.get("cam/seconds"), "test_f1": s.metrics.get("test/f1"),
                "test_auc": s.metrics.get("test/auc"), "model_uri": s.model_uri, "phases": s.phases.table()}

    (out / "gpu_checks.json").write_text(json.dumps(res, indent=1, default=str))
    failed = [k for k, v in res.items() if isinstance(v, dict) and "error" in v]
    if failed:
        sys.exit(f"gpu_checks: {', '.join(failed)} failed (errors in {out / 'gpu_checks.json'})")


if __name__ == "__main__":
    main()
