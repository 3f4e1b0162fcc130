#!/usr/bin/env bash
# README set-up command 2: on a fresh machine, install everything the tests need and run them: the Debian
# packages the tests start as services (scripts/test-packages.sh) and the project's venv (scripts/env.sh).
# Two pytest-xdist workers by default (CUSHING_TEST_WORKERS=N to change, 0 for one process): many tests wait on
# servers, Slurm and subprocesses, so two workers fill a 2-core machine; tests sharing a session fixture (the
# PostgreSQL stack, the demo sweep) stay on one worker (tests/conftest.py). Each process computes on one thread
# (OMP_NUM_THREADS, unless set): OpenMP threads spin while they wait, and two workers' thread pools fighting for
# two cores made the suite slower than one process.
set -euo pipefail
bash "$(dirname "${BASH_SOURCE[0]}")/test-packages.sh"
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$CUSHING_ROOT"
workers="${CUSHING_TEST_WORKERS:-2}"
if [ "$workers" != 0 ]; then
    export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
fi
exec python -m pytest -n "$workers" --dist loadgroup "$@"
