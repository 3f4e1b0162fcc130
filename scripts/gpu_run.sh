#!/usr/bin/env bash
# A GPU session's checks, in priority order, each bounded in time; results land in $OUT.
#   bash scripts/gpu_run.sh sweep   # the sweep's speed (issue 7): a measured 20-epoch grid, compile, per-run cost
#   bash scripts/gpu_run.sh engine  # the engine against the compute floor, CUDA training, Grad-CAM, SAM
# Expects the project's extra wheels in .whl/ (README, Benchmarks: "GPU checks") on a machine with PyTorch and timm.
set -uo pipefail
what=${1:-sweep}
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1 PYTHONWARNINGS=ignore HF_HUB_OFFLINE=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/nvidia.txt"
python3 -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__)" | tee -a "$OUT/nvidia.txt"
if [ "$what" = sweep ]; then
  timeout 330 python3 scripts/gpu_sweep_timing.py --out "$OUT" --epochs 20 --workers 2 2>&1 | tee "$OUT/sweep_timing.log" | tail -6
  timeout 240 python3 -m cushing bench --models densenet121,swin_b --frozen "" --epochs 4 --compile reduce-overhead \
    --out "$OUT/bench_compile.json" 2>&1 | tee "$OUT/bench_compile.log" | tail -4
  timeout 90 python3 -m cushing bench run --models vit_b_32 --img-size 224 --epochs 20 --out "$OUT/bench_run.json" \
    2>&1 | tee "$OUT/bench_run.log" | tail -2
  exit 0
fi
timeout 120 python3 -m cushing bench --models resnet50,vit_b_16,swin_b,dinov2_b --frozen dinov2_b --epochs 4 \
  --out "$OUT/bench_required.json" 2>&1 | tee "$OUT/bench_required.log"
timeout 240 python3 scripts/gpu_checks.py --out "$OUT" 2>&1 | tee "$OUT/checks.log" | grep -E "^[a-z_0-9]+ \{" | cut -c1-700
timeout 170 python3 -m cushing bench --epochs 3 --frozen dinov2_s,dinov2_l \
  --models densenet121,densenet161,densenet169,densenet201,resnet18,resnet34,resnet101,resnet152,vit_b_32,vit_l_16,vit_l_32,swin_t,swin_s,swin_l,dinov2_s,dinov2_l \
  --out "$OUT/bench_rest.json" 2>&1 | tee "$OUT/bench_rest.log"
