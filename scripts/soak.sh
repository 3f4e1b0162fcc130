#!/usr/bin/env bash
# The chaos soak (scripts/soak.py), longer than the one CI runs: for a cluster or a nightly job.
#   bash scripts/soak.sh --minutes 30 [--seed N] [--configs 6] [--workers 2] [--dir DIR]
# Prints the seed, each stop and the invariants; exits non-zero when one fails.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
exec python "$CUSHING_ROOT/scripts/soak.py" "$@"
