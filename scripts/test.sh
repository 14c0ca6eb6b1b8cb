#!/usr/bin/env bash
# The test suite, slow multi-process tests included.
source "$(dirname "$0")/venv.sh"
exec python -m pytest -q "$@"
