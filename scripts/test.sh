#!/usr/bin/env bash
# README set-up command 2: on a fresh machine, install everything the tests need and run them.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$CUSHING_ROOT"
exec python -m pytest "$@"
