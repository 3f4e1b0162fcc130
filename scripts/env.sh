#!/usr/bin/env bash
# Source me: makes (once) and activates the project's virtual environment and makes this checkout the `cushing`
# that Python imports (PYTHONPATH), even when other clones on the machine share the venv. It installs no Debian
# package: the main job needs none; scripts/test.sh installs the services the tests start (scripts/test-packages.sh).
#
# The venv lives outside the clone, keyed by the hash of the pinned requirements (the package's, and its `test`
# and `docs` extras) and the Python version, so CI runs and fresh clones reuse it instead of reinstalling ~6 GB of
# PyTorch. Override with CUSHING_VENV=/path.
#
# The caller's shell options come back as they were when this file ends. `set +o` prints them, but it must run in
# this shell: in a command substitution bash turns errexit off, so "$(set +o)" says `set +o errexit` even in a
# `set -e` script, and eval-ing it would switch off the caller's stop-at-the-first-failure.
_cushing_saved_opts="$(set +o)"
case $- in *e*) _cushing_saved_opts+=$'\nset -o errexit' ;; esac
set -euo pipefail
CUSHING_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export CUSHING_ROOT

_cushing_log() { printf '[cushing env] %s\n' "$*" >&2; }

# pip's notes about this machine's local index folders are noise; real errors still show
_cushing_quiet() { grep -vE "^WARNING: Location .* is ignored|BuildBackendWarning|^\s*$|^  " >&2 || true; }

_cushing_python() {
  for p in python3.11 python3; do command -v "$p" >/dev/null 2>&1 && { command -v "$p"; return; }; done
  _cushing_log "no python3 found"; return 1
}

# A venv is ready when it was finished (.complete, written last) and still has its interpreter.
_cushing_venv_ready() { [ -n "${CUSHING_VENV:-}" ] && [ -f "$CUSHING_VENV/.complete" ] && [ -x "$CUSHING_VENV/bin/python" ]; }

# Builds the shared venv under an exclusive lock (flock on $CUSHING_VENV.lock): shells that source this file at the
# same time would otherwise delete each other's half-built venv. One builds; the others wait, then use its venv.
# The venv is built in place, not in a temporary folder moved into place afterwards, because a venv records its
# own path (bin/activate, the scripts' #! lines); .complete, written last, is what makes it usable.
_cushing_venv_build() {
  local py="$1" lock="$CUSHING_VENV.lock" fd
  mkdir -p "$(dirname "$CUSHING_VENV")"
  exec {fd}>>"$lock"
  if ! command -v flock >/dev/null 2>&1; then
    _cushing_log "no flock (util-linux): building $CUSHING_VENV unlocked; source scripts/env.sh in one shell at a time"
  elif ! flock -n "$fd"; then
    _cushing_log "waiting for another shell that is building $CUSHING_VENV (lock: $lock)"
    flock "$fd"
  fi
  if ! _cushing_venv_ready; then
    _cushing_log "creating $CUSHING_VENV (first run: installs PyTorch and the pinned requirements)"
    rm -rf "$CUSHING_VENV"
    if ! _cushing_venv_install "$py"; then
      exec {fd}>&-
      _cushing_log "building $CUSHING_VENV failed (the next source of scripts/env.sh starts it again)"
      return 1
    fi
  fi
  exec {fd}>&-
}

_cushing_venv_install() {
  local py="$1"
  "$py" -m venv "$CUSHING_VENV" || return 1
  "$CUSHING_VENV/bin/pip" install -q --upgrade pip setuptools wheel 2>&1 | _cushing_quiet
  [ "${PIPESTATUS[0]}" -eq 0 ] || return 1
  "$CUSHING_VENV/bin/pip" install -q -r <("$CUSHING_VENV/bin/python" - "$CUSHING_ROOT/pyproject.toml" <<'PY'
import sys, tomllib
p = tomllib.load(open(sys.argv[1], "rb"))["project"]
print("\n".join(p["dependencies"] + [pin for g in ("test", "docs") for pin in p["optional-dependencies"][g]]))
PY
) 2>&1 | _cushing_quiet
  [ "${PIPESTATUS[0]}" -eq 0 ] || return 1
  touch "$CUSHING_VENV/.complete"
}

_cushing_venv() {
  local py hash
  py="$(_cushing_python)"
  hash="$("$py" - "$CUSHING_ROOT/pyproject.toml" <<'PY'
import hashlib, sys, tomllib
p = tomllib.load(open(sys.argv[1], "rb"))["project"]
extras = p["optional-dependencies"]
pins = sorted(p["dependencies"]) + sorted(extras["test"]) + sorted(extras["docs"])
print(hashlib.sha256(("\n".join(pins) + sys.version[:4]).encode()).hexdigest()[:12])
PY
)"
  CUSHING_VENV="${CUSHING_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/cushing/venv-$hash}"
  export CUSHING_VENV
  _cushing_venv_ready || _cushing_venv_build "$py" || return 1
  # The venv is shared by every clone on the machine, so the package is not installed into it (an install would
  # follow whichever clone ran last): this clone goes first on PYTHONPATH, and `cushing` runs `python -m cushing`.
  if ls "$CUSHING_VENV"/lib/python*/site-packages/__editable__*cushing* >/dev/null 2>&1; then
    "$CUSHING_VENV/bin/pip" uninstall -q -y cushing 2>&1 | _cushing_quiet
  fi
  # written under a temporary name and renamed: a shell running `cushing` meanwhile never finds it half-written
  printf '#!/bin/sh\n# the clone whose scripts/env.sh was sourced last in this shell (PYTHONPATH)\nexec "%s" -m cushing "$@"\n' \
    "$CUSHING_VENV/bin/python" > "$CUSHING_VENV/bin/.cushing.$$"
  chmod +x "$CUSHING_VENV/bin/.cushing.$$"
  mv -f "$CUSHING_VENV/bin/.cushing.$$" "$CUSHING_VENV/bin/cushing"
  # shellcheck disable=SC1091
  source "$CUSHING_VENV/bin/activate"
  # this clone first, then the caller's other entries (not this clone again, no empty ones). Plain bash, no grep: a
  # pipeline that selects nothing fails, and under this file's pipefail and errexit a shell that had already sourced
  # it (PYTHONPATH = this clone alone) stopped here, silently.
  local entry rest=""
  local -a entries=()
  IFS=: read -r -a entries <<< "${PYTHONPATH:-}"
  for entry in "${entries[@]}"; do
    if [ -n "$entry" ] && [ "$entry" != "$CUSHING_ROOT" ]; then rest+=":$entry"; fi
  done
  export PYTHONPATH="$CUSHING_ROOT$rest"
}

_cushing_venv
eval "$_cushing_saved_opts"
unset _cushing_saved_opts
# the status of `source scripts/env.sh`, also where `set -e` does not stop it (`source scripts/env.sh && ...`)
_cushing_venv_ready
