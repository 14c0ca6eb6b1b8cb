#!/usr/bin/env bash
# The test suite, slow multi-process tests included.
source "$(dirname "$0")/venv.sh"
source "$(dirname "$0")/system-deps.sh"
exec python -m pytest -q "$@"
