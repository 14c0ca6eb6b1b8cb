#!/usr/bin/env bash
# The docker-compose cluster's settings and secrets, made once per checkout (README: "Run on a cluster").
#
#   scripts/cluster-setup.sh [DIR]     # DIR: where docker-compose.yml runs (default: this checkout)
#
# Creates DIR/.env from .env.example, and DIR/secrets/ (mode 700; ignored by git and by docker
# builds) with one file per secret (mode 600), random where it is a password or token:
#   ray_auth_token          Ray's token (every node and the driver: RAY_AUTH_TOKEN_PATH)
#   postgres_password       the PostgreSQL user mlflow's password (POSTGRES_PASSWORD_FILE)
#   pgpass                  the same password for the MLflow server's libpq (PGPASSFILE)
#   mlflow_admin_password   the MLflow login of the user admin (the UI, the driver, the workers)
#   mlflow_auth_config      the MLflow server's basic-auth configuration (MLFLOW_AUTH_CONFIG_PATH)
#   mlflow_flask_secret_key the MLflow server's key for its CSRF tokens (MLFLOW_FLASK_SERVER_SECRET_KEY_FILE)
#   mlflow_credentials      the driver's and the workers' MLflow login (~/.mlflow/credentials)
# An existing file is never overwritten: run it again after an upgrade to add what is new. To
# change a password, delete the secrets and the volumes (docker compose down -v) and run it again:
# PostgreSQL and MLflow take their passwords only when their databases are first created.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DIR="$(cd "${1:-$ROOT}" && pwd)"
SECRETS="$DIR/secrets"
made=()

umask 077
mkdir -p "$SECRETS"
chmod 700 "$SECRETS"

if [ ! -e "$DIR/.env" ]; then
  cp "$ROOT/.env.example" "$DIR/.env"
  made+=(.env)
fi

random_hex() { od -An -vtx1 -N"$1" /dev/urandom | tr -d ' \n'; }

# write NAME CONTENT: secrets/NAME, unless it exists
write() {
  local path="$SECRETS/$1"
  [ -e "$path" ] && return
  printf '%s' "$2" >"$path.tmp"   # no newline: a token file is read whole
  chmod 600 "$path.tmp"
  mv "$path.tmp" "$path"
  made+=("secrets/$1")
}
secret() { cat "$SECRETS/$1"; }

write ray_auth_token "$(random_hex 32)"
write postgres_password "$(random_hex 24)"
write mlflow_admin_password "$(random_hex 24)"
write mlflow_flask_secret_key "$(random_hex 32)"

# host:port:database:user:password (any host: the tests run the same file against 127.0.0.1)
write pgpass "*:*:mlflow:mlflow:$(secret postgres_password)"
write mlflow_auth_config "[mlflow]
# the users, their password hashes and permissions: tables in the tracking store's database
database_uri = postgresql+psycopg2://mlflow@postgres:5432/mlflow
default_permission = READ
admin_username = admin
admin_password = $(secret mlflow_admin_password)
authorization_function = mlflow.server.auth:authenticate_request_basic_auth"
write mlflow_credentials "[mlflow]
mlflow_tracking_username = admin
mlflow_tracking_password = $(secret mlflow_admin_password)"

if [ ${#made[@]} -gt 0 ]; then
  echo "created in $DIR: ${made[*]}"
else
  echo "nothing to do: $DIR/.env and every secret in $SECRETS exist"
fi
