#!/usr/bin/env bash
# ruff (lint and format check) and mypy, as CI and the pre-commit hooks run them.
set -euo pipefail
cd "$(dirname "$0")/.."
ruff check .
ruff format --check .
mypy
