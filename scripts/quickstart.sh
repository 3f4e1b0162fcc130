#!/usr/bin/env bash
# README set-up command 1: on a fresh machine, install, make the demo cohort, train, say where results are.
# Runs the MLproject main entry point on the embedded default tracking store (./mlflow.db + ./mlruns).
# Extra arguments go to `mlflow run` (e.g. -P model=swin_t -P epochs=10).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$CUSHING_ROOT"
export MLFLOW_EXPERIMENT_NAME="${MLFLOW_EXPERIMENT_NAME:-cushing}"
# Offline-friendly defaults for a CPU: random weights (no download), a small backbone at 112 px, 16 epochs at
# lr 0.01 (enough for ResNet-18 from scratch to learn the demo cohort's moon face and plethora; about 3 minutes).
mlflow run . --env-manager local --experiment-name "$MLFLOW_EXPERIMENT_NAME" \
  -P model=resnet18 -P pretrained=false -P epochs=16 -P lr=0.01 -P img_size=112 -P bootstrap=500 "$@"
uri="${MLFLOW_TRACKING_URI:-sqlite:///$CUSHING_ROOT/mlflow.db}"
cat <<MSG

Done. Results are in the tracking store $uri (artifacts under $CUSHING_ROOT/mlruns),
experiment '$MLFLOW_EXPERIMENT_NAME'. Look at them with:
  source scripts/env.sh && mlflow ui --backend-store-uri $uri
then open http://127.0.0.1:5000 (runs, per-sex metrics, plots, the logged model).
MSG
