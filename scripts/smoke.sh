#!/usr/bin/env bash
# The main job on a laptop CPU, offline: a small search on synthetic long-tailed data.
source "$(dirname "$0")/venv.sh"
exec python tune/search.py --study prompt_pool --profile smoke "$@"
