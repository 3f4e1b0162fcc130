#!/usr/bin/env bash
# A GPU session's checks, in priority order, each bounded in time; results land in $OUT.
#   bash scripts/gpu_run.sh sweep   # the sweep's speed (issue 7): a measured 20-epoch grid, compile, per-run cost
#   bash scripts/gpu_run.sh engine  # the engine against the compute floor, CUDA training, Grad-CAM, SAM
#   bash scripts/gpu_run.sh sweep bench_run  # only the named checks of a mode (a rerun of one that failed)
# Expects the project's extra wheels in .whl/ (Benchmarks: "GPU checks") on a machine with PyTorch and timm.
# Each check's output goes to $OUT/NAME.log and its exit code to $OUT/status_MODE.txt; the script exits 1 when any
# check failed (after running the others).
#
# CUSHING_GPU_DRY_RUN=1 runs every command on a CPU, in the current Python environment, at tiny sizes (`tiny`) and
# without the wheels or nvidia-smi: tests/test_gpu_scripts.py runs it, so that a renamed option or a moved module
# fails the suite instead of a GPU session.
set -uo pipefail
what=${1:-sweep}
only=${*:2}
dry=${CUSHING_GPU_DRY_RUN:-0}
: "${OUT:?set OUT to the folder for the results}"
case $what in sweep | engine) ;; *) echo "gpu_run.sh: unknown mode '$what' (sweep or engine)" >&2; exit 2 ;; esac
status="$OUT/status_$what.txt"
: > "$status"
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1 PYTHONWARNINGS=ignore HF_HUB_OFFLINE=1

# The same command at CPU sizes: 1 epoch, 14 px, resnet18 (dinov2_s where a backbone is frozen), one repeat, the
# demo study instead of the paper's, gpu_checks.py --quick. Every option stays as written, so the dry run checks
# them.
tiny() {
  cmd=()
  local a prev=
  for a in "$@"; do
    case $prev in
      --epochs) a=1 ;;
      --img-size) a=14 ;;
      --models) a=resnet18 ;;
      --frozen) a=${a:+dinov2_s} ;;
      --repeats) a=1 ;;
    esac
    cmd+=("$a")
    prev=$a
  done
  case " $* " in
    *" scripts/gpu_checks.py "*) cmd+=(--quick) ;;
    *" scripts/gpu_sweep_timing.py "*) cmd+=(--study projects/demo.yaml) ;;
    *" --img-size "*) ;;
    *" -m cushing bench "*) cmd+=(--img-size 14) ;;
  esac
}

# run LIMIT_S NAME CMD...: CMD bounded in time, its output on stdout and in $OUT/NAME.log, its exit code in $status
run() {
  local limit=$1 name=$2
  shift 2
  [ -z "$only" ] || [[ " $only " == *" $name "* ]] || return 0
  if [ "$dry" = 1 ]; then tiny "$@" && set -- "${cmd[@]}" && limit=600; fi  # a shared CPU is no GPU
  timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
  echo "$name ${PIPESTATUS[0]}" >> "$status"
}

if [ "$dry" = 1 ]; then
  # One thread per process: the tiny tensors gain nothing from more, and a shared CPU loses much to spinning threads.
  # torch.compile's call sites run but its compiler does not (minutes on a CPU; tests/test_engine.py compiles a
  # small CNN through Inductor, and only a GPU can say what reduce-overhead's CUDA graphs do).
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} OMP_NUM_THREADS=1 TORCH_COMPILE_DISABLE=1
  echo "dry run (CUSHING_GPU_DRY_RUN=1) on $(uname -n): no wheels installed, no nvidia-smi" | tee "$OUT/nvidia.txt"
else
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/nvidia.txt"
fi
python3 -c "import importlib.metadata as m; print('torch', m.version('torch'), 'timm', m.version('timm'))" \
  | tee -a "$OUT/nvidia.txt"  # the versions without their imports (6 s on a CPU)
if [ "$what" = sweep ]; then
  run 330 sweep_timing python3 scripts/gpu_sweep_timing.py --out "$OUT" --epochs 20 --workers 2 --img-size 224 \
    | tail -6
  run 240 bench_compile python3 -m cushing bench --models densenet121,swin_b --frozen "" --epochs 4 \
    --compile reduce-overhead --out "$OUT/bench_compile.json" | tail -4
  run 90 bench_run python3 -m cushing bench run --models vit_b_32 --img-size 224 --epochs 20 \
    --repeats 3 --out "$OUT/bench_run.json" | tail -2
else
  run 120 bench_required python3 -m cushing bench --models resnet50,vit_b_16,swin_b,dinov2_b --frozen dinov2_b \
    --epochs 4 --out "$OUT/bench_required.json"
  run 240 checks python3 scripts/gpu_checks.py --out "$OUT" | grep -E "^[a-z_0-9]+ \{" | cut -c1-700
  run 170 bench_rest python3 -m cushing bench --epochs 3 --frozen dinov2_s,dinov2_l \
    --models densenet121,densenet161,densenet169,densenet201,resnet18,resnet34,resnet101,resnet152,vit_b_32,vit_l_16,vit_l_32,swin_t,swin_s,swin_l,dinov2_s,dinov2_l \
    --out "$OUT/bench_rest.json"
fi
for name in $only; do
  grep -q "^$name " "$status" || { echo "gpu_run.sh: no check '$name' in mode $what" >&2; exit 2; }
done
! grep -v ' 0$' "$status"
