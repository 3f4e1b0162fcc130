#!/usr/bin/env bash
# The GPU session's checks, in priority order, each bounded in time; results land in $OUT.
# Expects the project's extra wheels in .whl/ (see the README's GPU section) on a machine with PyTorch and timm.
set -uo pipefail
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1 PYTHONWARNINGS=ignore HF_HUB_OFFLINE=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/nvidia.txt"
python3 -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__)" | tee -a "$OUT/nvidia.txt"
timeout 120 python3 -m cushing bench --models resnet50,vit_b_16,swin_b,dinov2_b --frozen dinov2_b --epochs 4 \
  --out "$OUT/bench_required.json" 2>&1 | tee "$OUT/bench_required.log"
timeout 240 python3 scripts/gpu_checks.py --out "$OUT" 2>&1 | tee "$OUT/checks.log" | grep -E "^[a-z_0-9]+ \{" | cut -c1-700
timeout 170 python3 -m cushing bench --epochs 3 --frozen dinov2_s,dinov2_l \
  --models densenet121,densenet161,densenet169,densenet201,resnet18,resnet34,resnet101,resnet152,vit_b_32,vit_l_16,vit_l_32,swin_t,swin_s,swin_l,dinov2_s,dinov2_l \
  --out "$OUT/bench_rest.json" 2>&1 | tee "$OUT/bench_rest.log"
