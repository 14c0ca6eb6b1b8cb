# Shared by scripts/cluster-setup.sh --rotate, cluster-backup.sh and cluster-restore.sh (sourced):
# the compose command and the stack's containers, run in the folder of docker-compose.yml.
# COMPOSE overrides the command (default: `docker compose`, else `docker-compose`); the compose
# variables (COMPOSE_PROJECT_NAME, COMPOSE_FILE, ...) apply as for any compose command.
if [ -n "${COMPOSE:-}" ]; then
  read -r -a compose <<<"$COMPOSE"
elif docker compose version >/dev/null 2>&1; then
  compose=(docker compose)
else
  compose=(docker-compose)
fi

# running_ids SERVICE: the ids of the service's running containers (`ps` lists exited ones too)
running_ids() {
  local id
  "${compose[@]}" ps -q "$1" 2>/dev/null | while read -r id; do
    [ "$(docker inspect -f '{{.State.Running}}' "$id" 2>/dev/null)" = true ] && echo "$id"
  done
  return 0
}

# container SERVICE: the id of a running container of the service (empty when none runs)
container() { running_ids "$1" | head -n 1; }

# running SERVICE: how many of its containers run
running() { running_ids "$1" | grep -c . || true; }

# need_running SERVICE...: exit 2 with one line unless each has a running container
need_running() {
  local service
  for service in "$@"; do
    if [ -z "$(container "$service")" ]; then
      echo "error: the stack in $PWD is not running ($service): start it with \`docker compose up -d\` first" >&2
      exit 2
    fi
  done
}

# wait_healthy SERVICE [SECONDS]: until its container's health check passes
wait_healthy() {
  local id deadline=$((SECONDS + ${2:-300}))
  id="$(container "$1")"
  until [ -n "$id" ] && [ "$(docker inspect -f '{{.State.Health.Status}}' "$id")" = healthy ]; do
    if [ $SECONDS -ge $deadline ]; then
      echo "error: $1 is not healthy after ${2:-300} s (docker compose logs $1)" >&2
      exit 1
    fi
    sleep 2
    id="$(container "$1")"
  done
}
