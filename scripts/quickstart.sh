#!/usr/bin/env bash
# README set-up command 1: on a fresh machine, install, make the demo cohort, train, say where results are.
# Runs the MLproject main entry point on the embedded default tracking store (./mlflow.db + ./mlruns). It installs
# no Debian package: the main job needs none (no database server, no browser, no cluster manager).
#
# Extra arguments go to `mlflow run`; a `-P NAME=VALUE` among them replaces this script's own value of NAME
# (`bash scripts/quickstart.sh -P epochs=2 -P img_size=64`), where passing both would make MLflow refuse the
# "Repeated parameter". A failed run ends the script with the run's exit status and without the "Done" message.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$CUSHING_ROOT"
export MLFLOW_EXPERIMENT_NAME="${MLFLOW_EXPERIMENT_NAME:-cushing}"

# Offline-friendly defaults for a CPU: random weights (no download), a small backbone at 112 px, 16 epochs at
# lr 0.01 (enough for ResNet-18 from scratch to learn the demo cohort's moon face and plethora; the run takes a little over
# a minute on two idle cores).
defaults=(model=resnet18 pretrained=false epochs=16 lr=0.01 img_size=112 bootstrap=500)

# the names the caller sets with -P NAME=VALUE, -PNAME=VALUE, --param-list NAME=VALUE or --param-list=NAME=VALUE
given=" "
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
  case "${args[i]}" in
    -P | --param-list) if ((i + 1 < ${#args[@]})); then given+="${args[i + 1]%%=*} "; fi ;;
    --param-list=*) a="${args[i]#--param-list=}" && given+="${a%%=*} " ;;
    -P?*) a="${args[i]#-P}" && given+="${a%%=*} " ;;
  esac
done
params=()
for d in "${defaults[@]}"; do
  case "$given" in *" ${d%%=*} "*) ;; *) params+=(-P "$d") ;; esac
done

# A new embedded store gets MLflow's schema from a template made once per MLflow version (a copy, instead of the
# launcher replaying MLflow's ~60 schema migrations: seconds); a no-op for an existing store or a server.
python cushing/tracking/stores.py seed "${MLFLOW_TRACKING_URI:-sqlite:///$CUSHING_ROOT/mlflow.db}"
status=0
mlflow run . --env-manager local --experiment-name "$MLFLOW_EXPERIMENT_NAME" "${params[@]}" "$@" || status=$?
if [ "$status" -ne 0 ]; then
  printf '\nquickstart: the run failed (exit %s); the messages above say why.\n' "$status" >&2
  exit "$status"
fi

uri="${MLFLOW_TRACKING_URI:-sqlite:///$CUSHING_ROOT/mlflow.db}"
cat <<MSG

Done. Results are in the tracking store $uri (artifacts under $CUSHING_ROOT/mlruns),
experiment '$MLFLOW_EXPERIMENT_NAME'. Look at them with:
  source scripts/env.sh && mlflow ui --backend-store-uri $uri
then open http://127.0.0.1:5000 (runs, per-sex metrics, plots, the logged model).
MSG
