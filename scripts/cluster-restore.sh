#!/usr/bin/env bash
# Bring the docker-compose stack back to a backup of scripts/cluster-backup.sh (README: "Back up and restore").
#
#   scripts/cluster-restore.sh FILE [DIR]   # DIR: where docker-compose.yml runs (default: this checkout)
#
# On a running stack -- a fresh one (`docker compose down -v`, then `up -d`), the one backed up, or
# one with other secrets -- with no search running (refused with one line otherwise: a driver
# container, `docker compose run` ones included, or a held search lock), in this order:
#  1. checks the whole backup before it changes anything: the file's and its parts' tar listings,
#     and the dump's table of contents (pg_restore --list);
#  2. restores the dump into a new database, mlflow_restore, next to the live one (a failure
#     drops it and changes nothing), and gives its MLflow admin this stack's password hash (the
#     admin logs in with this stack's secrets/mlflow_admin_password, not the backed-up one);
#  3. replaces the MLflow artifacts and the shared volume's search folders and phase-1 cache (the
#     weights cache stays);
#  4. stops the MLflow server, swaps the databases in one transaction (mlflow_restore renamed
#     mlflow, the old one renamed away, then dropped), runs db-setup (this stack's role passwords
#     -- the roles are not in the dump -- and grants), starts the server and runs mlflow-setup
#     (the searcher's password from this stack's secrets, EDIT on the restored experiments).
# Killed during step 2 or 3, run it again (a leftover mlflow_restore is made again). The swap is
# one transaction: the live database is the old or the new one, never none.
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
refuse_while_searching restore
PG="$(container postgres)"
psql_q() { docker exec -i "$PG" psql -v ON_ERROR_STOP=1 -q -At -U postgres "$@"; }
bad() { echo "error: $FILE: $1" >&2; exit 2; }

# 1. the whole backup, checked before anything changes
work="$(mktemp -d)"
swapped=""
cleanup() {
  rm -rf "$work"
  [ -n "$swapped" ] && return
  psql_q -d postgres -c "DROP DATABASE IF EXISTS mlflow_restore WITH (FORCE)" >/dev/null 2>&1 || true
  psql_q -d postgres -c "ALTER DATABASE mlflow WITH ALLOW_CONNECTIONS true" >/dev/null 2>&1 || true
}
trap cleanup EXIT
trap 'exit 1' INT TERM
tar -tf "$FILE" >"$work/list" 2>/dev/null || bad "not a tar archive (tar -tf failed)"
for part in backup.txt postgres.dump mlartifacts.tar shared.tar; do
  grep -qx "$part" "$work/list" || bad "not a backup of scripts/cluster-backup.sh (no $part)"
done
mkdir "$work/parts"
tar -C "$work/parts" -xf "$FILE" backup.txt postgres.dump mlartifacts.tar shared.tar || bad "cannot be read whole (tar -xf failed)"
for part in mlartifacts.tar shared.tar; do
  tar -tf "$work/parts/$part" >/dev/null 2>&1 || bad "$part is damaged (tar -tf failed)"
done
docker exec -i "$PG" pg_restore --list <"$work/parts/postgres.dump" >"$work/toc" 2>"$work/toc.err" ||
  bad "postgres.dump is damaged (pg_restore --list: $(head -n 1 "$work/toc.err"))"
grep -q ' SCHEMA - optuna \| TABLE public runs ' "$work/toc" || bad "postgres.dump holds neither MLflow's runs nor the schema optuna"

# 2. the dump, into a database beside the live one
owner="$(psql_q -d postgres -c "SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = 'mlflow'")"
psql_q -d postgres -c "DROP DATABASE IF EXISTS mlflow_restore WITH (FORCE)"
psql_q -d postgres -c "CREATE DATABASE mlflow_restore OWNER \"${owner:-postgres}\" TEMPLATE template0"
docker exec -i "$PG" pg_restore -U postgres -d mlflow_restore --exit-on-error --single-transaction \
  <"$work/parts/postgres.dump"
admin_hash="$(psql_q -d mlflow -c "SELECT password_hash FROM users WHERE username = 'admin'" 2>/dev/null || true)"
if [ -n "$admin_hash" ]; then   # a hash, not the password: this stack's admin password opens the restored stack
  echo "UPDATE users SET password_hash = :'hash' WHERE username = 'admin';" |
    psql_q -d mlflow_restore -v hash="$admin_hash" >/dev/null
fi

# 3. the files (no search runs; the MLflow server only serves them)
docker exec -i "$(container mlflow)" lpt-entrypoint sh -c \
  'find /mlartifacts -mindepth 1 -delete && tar -C /mlartifacts -xf -' <"$work/parts/mlartifacts.tar"
docker exec -i "$(container ray-head)" lpt-entrypoint sh -c \
  'find /shared -mindepth 1 -maxdepth 1 ! -name huggingface -exec rm -rf {} + && tar -C /shared -xf -' <"$work/parts/shared.tar"

# 4. the swap, with the MLflow server stopped and no session left on the live database
"${compose[@]}" stop mlflow
psql_q -d postgres >/dev/null <<'SQL'
ALTER DATABASE mlflow WITH ALLOW_CONNECTIONS false;
SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE datname = 'mlflow';
BEGIN;
ALTER DATABASE mlflow RENAME TO mlflow_replaced;
ALTER DATABASE mlflow_restore RENAME TO mlflow;
COMMIT;
SQL
swapped=1
psql_q -d postgres -c "DROP DATABASE mlflow_replaced WITH (FORCE)"
"${compose[@]}" run --rm -T --no-deps db-setup
"${compose[@]}" start mlflow
wait_healthy mlflow
"${compose[@]}" run --rm -T --no-deps mlflow-setup
echo "restored $FILE into the stack in $DIR ($(sed -n 1p "$work/parts/backup.txt"))"
