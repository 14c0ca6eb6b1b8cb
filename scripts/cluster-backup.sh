#!/usr/bin/env bash
# Back up the docker-compose stack into one dated file (README: "Back up and restore").
#
#   scripts/cluster-backup.sh [--out FILE] [DIR]   # DIR: where docker-compose.yml runs (default: this checkout)
#
# FILE (default DIR/backups/lpt-backup-YYYYmmdd-HHMMSS.tar) is a tar of
#   postgres.dump     pg_dump of the database mlflow: MLflow's runs, models and users, and the
#                     schema optuna (the searches' Optuna studies), with their owners and grants
#   mlartifacts.tar   the MLflow artifacts (the mlartifacts volume: models, reports, tables)
#   shared.tar        the shared volume but its weights cache (/shared/huggingface): the search
#                     folders and the phase-1 cache
#   backup.txt        when, from which stack, and the versions
# scripts/cluster-restore.sh FILE brings a stack back to it. The file holds no secret file, but the
# database holds the MLflow users' password hashes: keep it as safe as secrets/. Back up between
# searches: a search that runs meanwhile may be caught half-written. Needs the stack running.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out=""
if [ "${1:-}" = --out ]; then
  out="${2:?--out needs a file name}"
  [ "${out#/}" = "$out" ] && out="$PWD/$out"
  shift 2
fi
DIR="$(cd "${1:-$ROOT}" && pwd)"
cd "$DIR"
# shellcheck source=scripts/compose-lib.sh
source "$ROOT/scripts/compose-lib.sh"
need_running postgres mlflow ray-head
umask 077
out="${out:-$DIR/backups/lpt-backup-$(date +%Y%m%d-%H%M%S).tar}"
mkdir -p "$(dirname "$out")"
work="$(mktemp -d)"
trap 'rm -rf "$work" "$out.partial"' EXIT

docker exec "$(container postgres)" pg_dump -U postgres -d mlflow --format=custom >"$work/postgres.dump"
docker exec "$(container mlflow)" lpt-entrypoint tar -C /mlartifacts -cf - . >"$work/mlartifacts.tar"
docker exec "$(container ray-head)" lpt-entrypoint tar -C /shared --exclude=./huggingface -cf - . >"$work/shared.tar"
{
  echo "lpt-studies cluster backup, $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "stack: $DIR (compose project $(docker inspect -f '{{index .Config.Labels "com.docker.compose.project"}}' "$(container postgres)"))"
  echo "postgres: $(docker exec "$(container postgres)" postgres --version)"
  echo "image: $(docker inspect -f '{{.Config.Image}}' "$(container mlflow)"), $(docker exec "$(container mlflow)" lpt-entrypoint mlflow --version)"
} >"$work/backup.txt"
tar -C "$work" -cf "$out.partial" backup.txt postgres.dump mlartifacts.tar shared.tar
mv "$out.partial" "$out"
echo "backup: $out ($(du -h "$out" | cut -f1): database $(du -h "$work/postgres.dump" | cut -f1), artifacts $(du -h "$work/mlartifacts.tar" | cut -f1), searches $(du -h "$work/shared.tar" | cut -f1))"
