#!/usr/bin/env bash
# Bring the docker-compose stack back to a backup of scripts/cluster-backup.sh (README: "Back up and restore").
#
#   scripts/cluster-restore.sh FILE [DIR]   # DIR: where docker-compose.yml runs (default: this checkout)
#
# On a running stack -- a fresh one (`docker compose down -v`, then `up -d`) or the one backed up --
# with no search running, it replaces the MLflow artifacts and the shared volume's search folders
# and phase-1 cache with the backup's (the weights cache stays), then the database mlflow: the
# MLflow server stops, the database is made again from the dump (runs, models, MLflow's users,
# the Optuna studies), db-setup sets this stack's role passwords and grants, the server starts, and
# mlflow-setup gives the searcher this stack's password and EDIT on the restored experiments.
# MLflow's admin keeps the password it had in the backed-up stack: restore with that stack's
# secrets/ (keep it with the backups, as safe), or the admin logs in with the old password.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
FILE="${1:?usage: scripts/cluster-restore.sh FILE [DIR]}"
[ -f "$FILE" ] || { echo "error: $FILE: no such backup file" >&2; exit 2; }
FILE="$(cd "$(dirname "$FILE")" && pwd)/$(basename "$FILE")"
DIR="$(cd "${2:-$ROOT}" && pwd)"
cd "$DIR"
# shellcheck source=scripts/compose-lib.sh
source "$ROOT/scripts/compose-lib.sh"
need_running postgres mlflow ray-head
if [ "$(running driver)" != 0 ]; then
  echo "error: a search is running (the driver service): restore once it has ended" >&2
  exit 2
fi
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
tar -C "$work" -xf "$FILE"
for part in postgres.dump mlartifacts.tar shared.tar; do
  [ -s "$work/$part" ] || { echo "error: $FILE: not a backup of scripts/cluster-backup.sh (no $part)" >&2; exit 2; }
done

# the files, while nothing writes them (no search runs; the MLflow server only serves them)
docker exec -i "$(container mlflow)" lpt-entrypoint sh -c \
  'find /mlartifacts -mindepth 1 -delete && tar -C /mlartifacts -xf -' <"$work/mlartifacts.tar"
docker exec -i "$(container ray-head)" lpt-entrypoint sh -c \
  'find /shared -mindepth 1 -maxdepth 1 ! -name huggingface -exec rm -rf {} + && tar -C /shared -xf -' <"$work/shared.tar"

# the database, with the MLflow server stopped
"${compose[@]}" stop mlflow
printf '%s\n' "DROP DATABASE IF EXISTS mlflow WITH (FORCE);" "CREATE DATABASE mlflow OWNER mlflow;" |
  docker exec -i "$(container postgres)" psql -v ON_ERROR_STOP=1 -q -U postgres -d postgres
docker exec -i "$(container postgres)" pg_restore -U postgres -d mlflow --exit-on-error --single-transaction \
  <"$work/postgres.dump"
"${compose[@]}" run --rm -T --no-deps db-setup
"${compose[@]}" start mlflow
wait_healthy mlflow
"${compose[@]}" run --rm -T --no-deps mlflow-setup
echo "restored $FILE into the stack in $DIR ($(sed -n 1p "$work/backup.txt"))"
