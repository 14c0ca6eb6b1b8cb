#!/bin/sh
# The image's entrypoint (installed as /usr/local/bin/lpt-entrypoint): runs the command as the
# service user lpt under tini.
#
# Started as root (compose does), it first installs every secret compose mounts under
# /run/secrets -- bind mounts of the host's files, owned by the host user with mode 600, which lpt
# could not read -- as /run/lpt-secrets/NAME, owned by lpt with mode 400 (a tmpfs: compose's
# `tmpfs:` mounts one there, so no copy reaches the container's disk layer), then drops to lpt for
# good. It does so at each start of the container (PID 1), so that a restarted container reads
# secrets rotated since (scripts/cluster-setup.sh --rotate). The services find them through
# environment variables that hold paths, never values (RAY_AUTH_TOKEN_PATH, PGPASSFILE,
# MLFLOW_AUTH_CONFIG_PATH, NAME_FILE, ~/.mlflow/credentials), so `docker inspect` shows no secret.
# Started as lpt, it runs the command directly.
#
# `lpt-entrypoint CMD` also runs any later command as lpt: the health checks, `docker exec`.
set -eu
SECRETS=/run/lpt-secrets

if [ "$(id -u)" = 0 ]; then
  if [ "$$" = 1 ] || [ ! -e "$SECRETS/.installed" ]; then   # at the container's start, not at each `docker exec`
    for file in /run/secrets/*; do
      [ -f "$file" ] && install -m 400 -o lpt -g lpt "$file" "$SECRETS/$(basename "$file")"   # replaces one there
    done
    touch "$SECRETS/.installed"
  fi
  export HOME=/home/lpt USER=lpt LOGNAME=lpt
  exec setpriv --reuid=lpt --regid=lpt --init-groups -- "$0" "$@"
fi

# A secret some variable names but compose did not mount: say which, not a traceback later.
for path in $(env | sed -n "s|^[A-Z_]*=\($SECRETS/[A-Za-z0-9_.-]*\)$|\1|p"); do
  if [ ! -r "$path" ]; then
    echo "lpt-entrypoint: secret $path is missing: run scripts/cluster-setup.sh on the host, then" \
         "list $(basename "$path") under this service's secrets: in docker-compose.yml" >&2
    exit 1
  fi
done
# NAME_FILE=/run/lpt-secrets/x for a program that takes a secret only from its environment
# (MLflow's MLFLOW_FLASK_SERVER_SECRET_KEY): NAME is set from the file, in this process only.
# AWS_*_FILE (AWS_SHARED_CREDENTIALS_FILE) stay paths: the AWS SDK reads those files itself.
for name in $(env | sed -n "s|^\([A-Z_]*\)_FILE=$SECRETS/.*|\1|p" | grep -v '^AWS_'); do
  value="$(eval "cat \"\$${name}_FILE\"")"
  export "$name=$value"
  unset "${name}_FILE"
done
exec tini -s -- "$@"
