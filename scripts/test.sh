#!/usr/bin/env bash
# The test suite, slow multi-process tests included.
source "$(dirname "$0")/venv.sh"
source "$ROOT/scripts/system-deps.sh"   # venv.sh set ROOT and cd there: $0 may be relative
exec python -m pytest -q "$@"
