#!/usr/bin/env bash
# The Debian packages the tests start as real services, installed when missing (scripts/test.sh runs this; the
# main job needs none of them): PostgreSQL (the production stack), Chromium (the MLflow UI, the dashboard and the
# documentation site in a real browser), Slurm and MUNGE (a throwaway single-node cluster).
# CUSHING_SKIP_APT=1 skips it (a machine without apt, or one where an administrator installs packages).
set -euo pipefail
need=()
ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1 || need+=(postgresql)
command -v chromium >/dev/null 2>&1 || need+=(chromium)
[ -x /usr/sbin/slurmctld ] || command -v slurmctld >/dev/null 2>&1 || need+=(slurm-wlm)
[ -x /usr/sbin/munged ] || command -v munged >/dev/null 2>&1 || need+=(munge)
if [ "${#need[@]}" -eq 0 ] || [ "${CUSHING_SKIP_APT:-0}" = 1 ]; then exit 0; fi
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
printf '[cushing test] installing Debian packages the tests use: %s\n' "${need[*]}" >&2
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
