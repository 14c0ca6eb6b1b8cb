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

# The stack's compose project, read once from its containers' labels (one compose call: each costs
# a second or more, and the scripts ask for containers often); empty when it has none.
STACK_PROJECT="$("${compose[@]}" ps -q 2>/dev/null | head -n 1 |
  xargs -r docker inspect -f '{{index .Config.Labels "com.docker.compose.project"}}' 2>/dev/null || true)"

# running_ids SERVICE: the ids of the service's running (or paused) containers that `up` made (not
# those of `run`: com.docker.compose.oneoff), by their labels, as `compose ps` finds them
running_ids() {
  [ -n "$STACK_PROJECT" ] || return 0
  docker ps -q --no-trunc --filter "label=com.docker.compose.project=$STACK_PROJECT" \
    --filter "label=com.docker.compose.service=$1" --filter label=com.docker.compose.oneoff=False
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

# passes_check ID: the container's health check, run now (Docker runs it every `interval`, 10 s:
# a service that came up between two of its runs is seen at once)
passes_check() {
  local test=()
  mapfile -t test < <(docker inspect -f '{{range .Config.Healthcheck.Test}}{{println .}}{{end}}' "$1" 2>/dev/null)
  case "${test[0]:-}" in
    CMD) docker exec "$1" "${test[@]:1}" >/dev/null 2>&1 ;;
    CMD-SHELL) docker exec "$1" sh -c "${test[1]}" >/dev/null 2>&1 ;;
    *) return 1 ;;
  esac
}

# wait_healthy SERVICE [SECONDS]: until its container's health check passes (Docker's, or ours run now)
wait_healthy() {
  local id deadline=$((SECONDS + ${2:-300}))
  id="$(container "$1")"
  until [ -n "$id" ] && { [ "$(docker inspect -f '{{.State.Health.Status}}' "$id")" = healthy ] || passes_check "$id"; }; do
    if [ $SECONDS -ge $deadline ]; then
      echo "error: $1 is not healthy after ${2:-300} s (docker compose logs $1)" >&2
      exit 1
    fi
    sleep 2
    id="$(container "$1")"
  done
}

# ---------------------------------------------------------------- searches that run
# A search runs when a driver container of the stack runs (`docker compose run` makes them: `compose
# ps` omits those, their labels do not) or a driver elsewhere holds a search's lock
# (tune/engine/search_lock.py): the PostgreSQL advisory lock (pg_locks), or a search folder's
# search.lock on the shared volume (flock).

# project: the stack's compose project
project() { echo "$STACK_PROJECT"; }

# drivers: the ids of the stack's driver containers that run (paused ones too), one a line
drivers() {
  docker ps -q --filter "label=com.docker.compose.project=$(project)" --filter label=com.docker.compose.service=driver
}

# search_locks: one line per held search lock: "WHAT held by HOLDER" (HOLDER: "pid N on HOST since T")
search_locks() {
  docker exec "$(container postgres)" psql -U postgres -d postgres -At -c \
    "SELECT 'the advisory lock ' || l.objid || ' held by ' || coalesce(nullif(a.application_name, ''), 'pid ' || a.pid)
     FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid WHERE l.locktype = 'advisory' AND l.granted"
  local head
  head="$(container ray-head)"
  [ -n "$head" ] || return 0
  docker exec "$head" lpt-entrypoint python -c '
import fcntl, glob, os
for path in sorted(glob.glob("/shared/*/search.lock") + glob.glob("/shared/*/*/search.lock")):
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # fails while a driver holds it (LOCK_EX)
    except BlockingIOError:
        print(path, "held by", open(path).read().strip() or "a driver")
    finally:
        os.close(fd)
'
}

# searches_running: one line per sign of a running search (empty: none)
searches_running() {
  local id
  for id in $(drivers); do
    echo "driver container $(docker inspect -f '{{.Name}}' "$id" | sed 's|^/||') (${id:0:12})"
  done
  search_locks
}

# refuse_while_searching ACTION: exit 2 with one line naming what runs, if a search runs
refuse_while_searching() {
  local found
  found="$(searches_running)"
  if [ -n "$found" ]; then
    echo "error: $1 refused: a search is running ($(paste -sd '#' <<<"$found" | sed 's/#/; /g')): $1 once it has ended" >&2
    exit 2
  fi
}

# need_free_space FOLDER MIB: exit 2 with one line unless FOLDER's disk has MIB MiB free
need_free_space() {
  local free
  mkdir -p "$1"
  free=$(($(df -Pk "$1" | awk 'NR == 2 {print $4}') / 1024))
  if [ "$free" -lt "$2" ]; then
    echo "error: $1: ${free} MiB free, less than the ${2} MiB margin: free space (or remove old backups) first" >&2
    exit 2
  fi
}
