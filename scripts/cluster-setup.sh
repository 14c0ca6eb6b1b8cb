#!/usr/bin/env bash
# The docker-compose cluster's settings and secrets, made once per checkout (README: "Run on a cluster").
#
#   scripts/cluster-setup.sh [DIR]                   # DIR: where docker-compose.yml runs (default: this checkout)
#   scripts/cluster-setup.sh --rotate NAME[,NAME...] [DIR]   # change secrets of a running stack in place
#   scripts/cluster-setup.sh --rotate all [DIR]
#
# Creates DIR/.env from .env.example, and DIR/secrets/ (mode 700; ignored by git and by docker
# builds) with one file per secret (mode 600), random where it is a password or token. Each
# service mounts only those it uses (docker-compose.yml):
#   ray_auth_token          Ray's token (every Ray node and the driver: RAY_AUTH_TOKEN_PATH)
#   postgres_password       PostgreSQL's superuser postgres (the postgres container and db-setup only)
#   mlflow_pgpass           the role mlflow's password, as libpq's PGPASSFILE (the MLflow server; db-setup)
#   optuna_pgpass           the role optuna's (the driver's Optuna storage; db-setup)
#   optuna_reader_pgpass    the role optuna_reader's, SELECT only (optuna-dashboard; db-setup)
#   mlflow_admin_password   the MLflow admin's password: people log in with it (mlflow-setup uses it)
#   mlflow_auth_config      the MLflow server's basic-auth configuration (MLFLOW_AUTH_CONFIG_PATH)
#   mlflow_flask_secret_key the MLflow server's key for its CSRF tokens (MLFLOW_FLASK_SERVER_SECRET_KEY_FILE)
#   mlflow_credentials      the MLflow login of the driver and the workers: the non-admin user
#                           searcher (~/.mlflow/credentials; mlflow-setup makes the user)
#   mlflow_registrar_credentials  the MLflow login of the one-shot service register only: the
#                           non-admin user registrar, the one that may change registered models
#                           (--rotate mlflow_registrar_credentials changes it)
#   aws_credentials         the object store's key pair, an AWS shared-credentials file ([default]
#                           aws_access_key_id, aws_secret_access_key) that every Ray node and the
#                           driver read (AWS_SHARED_CREDENTIALS_FILE) when LPT_STORAGE is an s3://
#                           URI. A random pair suits the S3 stand-in (profile s3), which takes any;
#                           for your own store (S3, MinIO, Ceph RGW) write its key pair into the file.
# An existing file is never overwritten: run it again after an upgrade to add what is new. It then
# prints the Python, Ray and PostgreSQL versions the stack runs (the built image's, when there is one).
#
# --rotate changes secrets of a running stack without losing anything: ALTER ROLE for the database
# roles (scripts/cluster_roles.py in the one-shot services), MLflow's update-password API for its
# users, then the services that read the secret are recreated. The names are those above (the
# pgpass files stand for their roles' passwords, mlflow_credentials for the searcher's,
# mlflow_registrar_credentials for the registrar's, and
# mlflow_admin_password rewrites mlflow_auth_config too); `all` rotates every one. aws_credentials
# is not rotated here: the object store's keys are changed at the store, then written into the file. Recreating the
# Ray nodes (ray_auth_token, mlflow_credentials) stops the trials on them: --rotate refuses while a
# search runs (a driver container, `docker compose run` ones included, or a held search lock),
# with one line naming it. Each new value is on disk before the server takes it (stage, below):
# a rotation killed at any point loses nothing, and `--rotate NAME` again finishes it. COMPOSE (default: `docker compose`, else `docker-compose`) is the
# command, run in DIR; COMPOSE_PROJECT_NAME and the other compose variables apply.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ROTATABLE=(ray_auth_token mlflow_flask_secret_key postgres_password mlflow_pgpass optuna_pgpass
           optuna_reader_pgpass mlflow_credentials mlflow_registrar_credentials mlflow_admin_password)
rotate=""
if [ "${1:-}" = --rotate ]; then
  rotate="${2:?--rotate needs a secret name (or all): ${ROTATABLE[*]}}"
  shift 2
fi
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

# put NAME CONTENT: secrets/NAME, written in place: compose mounts the file itself into the
# containers, and a container started again (the entrypoint installs the secrets at each start)
# must read the new content, not the old file a rename would leave it
put() {
  local path="$SECRETS/$1"
  printf '%s' "$2" >"$path"   # no newline: a token file is read whole
  chmod 600 "$path"
}
# write NAME CONTENT: secrets/NAME, unless it exists
write() {
  [ -e "$SECRETS/$1" ] && return
  put "$1" "$2"
  made+=("secrets/$1")
}
secret() { cat "$SECRETS/$1"; }

# what a derived secret holds, from its password
pgpass() { printf '*:*:mlflow:%s:%s' "$1" "$2"; }   # host:port:database:role:password (any host: the tests use 127.0.0.1)
auth_config() {
  printf '%s\n' "[mlflow]" \
    "# the users, their password hashes and permissions: tables in the tracking store's database" \
    "database_uri = postgresql+psycopg2://mlflow@postgres:5432/mlflow" \
    "default_permission = READ" \
    "admin_username = admin" \
    "admin_password = $1" \
    "authorization_function = mlflow.server.auth:authenticate_request_basic_auth"
}
credentials() { printf '%s\n' "[mlflow]" "mlflow_tracking_username = searcher" "mlflow_tracking_password = $1"; }
registrar_credentials() { printf '%s\n' "[mlflow]" "mlflow_tracking_username = registrar" "mlflow_tracking_password = $1"; }
aws_credentials() { printf '%s\n' "[default]" "aws_access_key_id = $1" "aws_secret_access_key = $2"; }

write ray_auth_token "$(random_hex 32)"
write postgres_password "$(random_hex 24)"
write mlflow_pgpass "$(pgpass mlflow "$(random_hex 24)")"
write optuna_pgpass "$(pgpass optuna "$(random_hex 24)")"
write optuna_reader_pgpass "$(pgpass optuna_reader "$(random_hex 24)")"
write mlflow_admin_password "$(random_hex 24)"
write mlflow_auth_config "$(auth_config "$(secret mlflow_admin_password)")"
write mlflow_credentials "$(credentials "$(random_hex 24)")"
write mlflow_registrar_credentials "$(registrar_credentials "$(random_hex 24)")"
write mlflow_flask_secret_key "$(random_hex 32)"
write aws_credentials "$(aws_credentials "LPT$(random_hex 8)" "$(random_hex 24)")"

if [ ${#made[@]} -gt 0 ]; then
  echo "created in $DIR: ${made[*]}"
elif [ -z "$rotate" ]; then
  echo "nothing to do: $DIR/.env and every secret in $SECRETS exist"
fi
for staged in "$SECRETS"/*.new; do   # see --rotate below
  case "$(basename "$staged")" in '*.new'|mlflow_auth_config.new) continue ;; esac
  if [ -z "$rotate" ]; then
    echo "warning: $staged: an interrupted --rotate: run scripts/cluster-setup.sh --rotate $(basename "$staged" .new) to finish it" >&2
  fi
done

# ---------------------------------------------------------------- the versions the stack runs
env_value() { sed -n "s/^$1=//p" "$DIR/.env" | tail -n 1; }
compose_file="$DIR/docker-compose.yml"
[ -f "$compose_file" ] || compose_file="$ROOT/docker-compose.yml"
pinned() {   # pinned python|postgres: "IMAGE|VERSION" from the x-base-images line of the compose file
  sed -n "s/^  $1: &$1-image \"\${[A-Z_]*:-\([^}]*\)}\" *# [A-Za-z]* \([0-9.]*\)$/\1|\2/p" "$compose_file"
}
image="$(env_value LPT_IMAGE)"
image="${image:-lpt-studies:latest}"
if command -v docker >/dev/null 2>&1 && docker image inspect "$image" >/dev/null 2>&1 \
   && built="$(docker run --rm --entrypoint python "$image" -c \
        'import platform, ray; print(platform.python_version(), ray.__version__)' 2>/dev/null)"; then
  echo "versions (image $image): Python ${built% *}, Ray ${built#* }"
else
  python_pin="$(pinned python)" postgres_pin="$(pinned postgres)"
  python_image="$(env_value PYTHON_IMAGE)"
  python_image="${python_image:-${python_pin%|*}}"
  [ "$python_image" = "${python_pin%|*}" ] && python_version="${python_pin#*|}" || python_version="of the image"
  ray_version="$(sed -n 's/^ray==//p' "$ROOT/constraints.txt")"
  echo "versions (pinned; build the image to check them): Python $python_version ($python_image), Ray $ray_version (constraints.txt), PostgreSQL ${postgres_pin#*|}"
fi

[ -n "$rotate" ] || exit 0

# ---------------------------------------------------------------- --rotate
IFS=, read -r -a names <<<"$rotate"
[ "$rotate" = all ] && names=("${ROTATABLE[@]}")
for name in "${names[@]}"; do
  case " ${ROTATABLE[*]} " in *" $name "*) ;; *)
    echo "error: --rotate $name: not a secret that can be rotated (${ROTATABLE[*]}, or all)" >&2; exit 2 ;; esac
done
cd "$DIR"
# shellcheck source=scripts/compose-lib.sh
source "$ROOT/scripts/compose-lib.sh"
need_running postgres mlflow
refuse_while_searching --rotate
# a set-up step, again, in a fresh container (the new secret files); extra lines go to its stdin
setup_step() { "${compose[@]}" run --rm -T --no-deps "$1" python scripts/cluster_roles.py "${@:2}"; }
# recreate the running containers of these services, so that they read the new secret files
recreate() {
  local names=() flags=() service n
  for service in "$@"; do
    n="$(running "$service")"
    [ "$n" -gt 0 ] || continue
    names+=("$service")
    [ "$service" = ray-worker ] && flags+=(--scale "ray-worker=$n")
  done
  [ ${#names[@]} -gt 0 ] || return 0
  "${compose[@]}" up -d --no-deps --force-recreate "${flags[@]}" "${names[@]}"
  for service in "${names[@]}"; do
    case "$service" in mlflow|ray-head) wait_healthy "$service" ;; esac
  done
}
# the one-shot set-up containers `up` made: removed, so that the next `up` or `run driver` makes
# new ones, which mount the secret files as they are now (a file that was replaced, not rewritten,
# stays the old one in a container made before, and it would set the old password back)
forget_setup() { "${compose[@]}" rm -f -s db-setup mlflow-setup >/dev/null 2>&1 || true; }

# A rotation never loses a secret: the new value goes to secrets/NAME.new first (fsync), then the
# server takes it, then secrets/NAME.new replaces secrets/NAME (rename, fsync of the folder). A
# rotation killed in between leaves NAME.new: `--rotate NAME` again takes that value (the server
# may have it already) and finishes; until then the file still holds the old value, which a stack
# `up` sets back on the roles (db-setup) wherever the server change was undone or never made.
stage() {   # stage NAME CONTENT: secrets/NAME.new, on disk
  printf '%s' "$2" >"$SECRETS/$1.new"
  chmod 600 "$SECRETS/$1.new"
  sync "$SECRETS/$1.new"
}
replace() {   # replace NAME...: each secrets/NAME.new becomes secrets/NAME
  local name
  for name in "$@"; do mv -f "$SECRETS/$name.new" "$SECRETS/$name"; done
  sync "$SECRETS"
}
# new_password NAME: the value an interrupted rotation of NAME staged, else a new random one
new_password() {
  local staged="$SECRETS/$1.new"
  if [ ! -e "$staged" ]; then random_hex 24; return; fi
  echo "--rotate $1: finishing the rotation an earlier run left in secrets/$1.new" >&2
  case "$1" in
    *_pgpass) sed 's/.*://' "$staged" ;;
    mlflow_credentials|mlflow_registrar_credentials) sed -n 's/^mlflow_tracking_password = //p' "$staged" ;;
    *) cat "$staged" ;;
  esac
}
# alter_role ROLE: its password on the server to the staged pgpass file's, as the superuser over
# PostgreSQL's local socket (no password on a command line: psql reads it from stdin)
alter_role() {
  printf '%s\n' "\\set pw '$(sed 's/.*://' "$SECRETS/${1}_pgpass.new")'" "ALTER ROLE \"$1\" PASSWORD :'pw';" |
    docker exec -i "$(container postgres)" psql -v ON_ERROR_STOP=1 -q -U postgres -d postgres >/dev/null
}
# an MLflow user's password (searcher's, registrar's: argv[1]) to the staged file's, as the admin
# (mlflow-setup's secrets); the new password on stdin, never on a command line
SET_USER='import os, sys
from mlflow.server.auth.client import AuthServiceClient
os.environ["MLFLOW_TRACKING_USERNAME"] = "admin"
os.environ["MLFLOW_TRACKING_PASSWORD"] = open("/run/lpt-secrets/mlflow_admin_password").read().strip()
AuthServiceClient(os.environ["MLFLOW_TRACKING_URI"]).update_user_password(sys.argv[1], sys.stdin.read().strip())
print("MLflow: the password of", sys.argv[1], "changed")'

rotate_one() {
  local name="$1" new
  case "$name" in
    ray_auth_token|mlflow_flask_secret_key)   # no server holds them: the services that read them start again
      [ -e "$SECRETS/$name.new" ] || stage "$name" "$(random_hex 32)"
      replace "$name"
      if [ "$name" = ray_auth_token ]; then recreate ray-head ray-worker ray-worker-gpu; else recreate mlflow; fi ;;
    postgres_password)   # the superuser's: ALTER ROLE as itself, the old password on stdin
      new="$(new_password "$name")"
      stage "$name" "$new"
      printf '%s\n%s\n' "$(secret postgres_password)" "$new" | setup_step db-setup rotate-superuser ||
        printf '%s\n%s\n' "$new" "$new" | setup_step db-setup rotate-superuser   # the server had it already
      replace "$name" ;;
    mlflow_pgpass|optuna_pgpass|optuna_reader_pgpass)
      local role="${name%_pgpass}"
      new="$(new_password "$name")"
      stage "$name" "$(pgpass "$role" "$new")"
      alter_role "$role"
      replace "$name"
      case "$role" in mlflow) recreate mlflow ;; optuna_reader) recreate optuna-dashboard ;; esac ;;
    mlflow_credentials)
      new="$(new_password "$name")"
      stage "$name" "$(credentials "$new")"
      printf '%s\n' "$new" | "${compose[@]}" run --rm -T --no-deps mlflow-setup python -c "$SET_USER" searcher
      replace "$name"
      recreate ray-worker ray-worker-gpu ;;
    mlflow_registrar_credentials)   # only the one-shot register (and mlflow-setup) read it: nothing to recreate
      new="$(new_password "$name")"
      stage "$name" "$(registrar_credentials "$new")"
      printf '%s\n' "$new" | "${compose[@]}" run --rm -T --no-deps mlflow-setup python -c "$SET_USER" registrar
      replace "$name" ;;
    mlflow_admin_password)   # MLflow's update-password as the admin, the old password on stdin
      new="$(new_password "$name")"
      stage "$name" "$new"
      stage mlflow_auth_config "$(auth_config "$new")"   # read at the server's first start only
      printf '%s\n%s\n' "$(secret mlflow_admin_password)" "$new" | setup_step mlflow-setup rotate-admin ||
        printf '%s\n%s\n' "$new" "$new" | setup_step mlflow-setup rotate-admin
      replace "$name" mlflow_auth_config ;;
  esac
  echo "rotated $name"
}

forget_setup
for name in "${names[@]}"; do rotate_one "$name"; done
forget_setup
