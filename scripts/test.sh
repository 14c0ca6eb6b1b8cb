#!/usr/bin/env bash
# The test suite, slow multi-process tests included; --fast leaves those out (under 3 minutes on
# 2 cores). CI runs it whole, after ruff (lint and format) and mypy: scripts/lint.sh.
source "$(dirname "$0")/venv.sh"
source "$ROOT/scripts/system-deps.sh"   # venv.sh set ROOT and cd there: $0 may be relative
if [ "${1:-}" = --fast ]; then
  shift
  exec python -m pytest -q -m "not slow" "$@"
fi
bash "$ROOT/scripts/lint.sh"
exec python -m pytest -q "$@"
