#!/usr/bin/env bash
# Back up the docker-compose stack into one dated file (README: "Back up and restore").
#
#   scripts/cluster-backup.sh [--out FILE] [--keep K] [--min-free MIB] [DIR]
#       DIR: where docker-compose.yml runs (default: this checkout)
#       --keep K: keep the newest K backups (lpt-backup-*.tar) in FILE's folder, delete older ones
#                 (default 7; 0 keeps every one)
#       --min-free MIB: refuse to start while FILE's disk has less free (default 5120 MiB: the
#                 volumes, Ray's spill and PostgreSQL's WAL share it)
#
# FILE (default DIR/backups/lpt-backup-YYYYmmdd-HHMMSS.tar) is a tar of
#   postgres.dump     pg_dump of the database mlflow: MLflow's runs, models and users, and the
#                     schema optuna (the searches' Optuna studies), with their owners and grants
#   mlartifacts.tar   the MLflow artifacts (the mlartifacts volume: models, reports, tables)
#   shared.tar        the shared volume but its weights cache (/shared/huggingface): the search
#                     folders and the phase-1 cache
#   backup.txt        when, from which stack, and the versions
# scripts/cluster-restore.sh FILE brings a stack back to it. The file holds no secret file, but the
# database holds the MLflow users' password hashes: keep it as safe as secrets/. Needs the stack running.
#
# Consistent under a running search: the search's driver containers (`docker compose run`) are
# paused (`docker pause`, the cgroup freezer) while the database is dumped and the shared volume
# copied, and unpaused after, on error too. The driver alone records a trial's end (Optuna's
# study in PostgreSQL, trials.parquet and Tune's state in the search folder), so the dump and the
# folder hold the same trials ended (but for one moment, milliseconds: Tune tells Optuna a trial
# ended just before the table callback writes its row; a pause inside it splits that trial).
# The workers go on (their epochs, checkpoints and MLflow metrics are ahead at most, which a
# --resume after a restore trains again). The pause lasts seconds (the database and the search
# folders, not the weights cache; the artifacts are copied after it, a superset of what the dump
# names), well inside Ray's node health-check window. A search whose driver runs outside this
# stack's containers (its lock held, no driver container) cannot be paused: the backup is refused.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="" keep=7 min_free=5120
while [ $# -gt 0 ]; do
  case "$1" in
    --out) out="${2:?--out needs a file name}"; [ "${out#/}" = "$out" ] && out="$PWD/$out"; shift 2 ;;
    --keep) keep="${2:?--keep needs a number}"; shift 2 ;;
    --min-free) min_free="${2:?--min-free needs a number of MiB}"; shift 2 ;;
    *) break ;;
  esac
done
for value in "$keep" "$min_free"; do
  [[ "$value" =~ ^[0-9]+$ ]] || { echo "error: --keep and --min-free take a whole number, not '$value'" >&2; exit 2; }
done
DIR="$(cd "${1:-$ROOT}" && pwd)"
cd "$DIR"
# shellcheck source=scripts/compose-lib.sh
source "$ROOT/scripts/compose-lib.sh"
need_running postgres mlflow ray-head
umask 077
out="${out:-$DIR/backups/lpt-backup-$(date +%Y%m%d-%H%M%S).tar}"
need_free_space "$(dirname "$out")" "$min_free"
work="$(mktemp -d)"
paused=()
unpause() {
  [ ${#paused[@]} -gt 0 ] && docker unpause "${paused[@]}" >/dev/null 2>&1
  paused=()
}
trap 'unpause; rm -rf "$work" "$out.partial"' EXIT

# a search whose driver is no container of this stack holds a lock no pause reaches
mapfile -t driver_ids < <(drivers)
outside="$(search_locks)"
for id in "${driver_ids[@]}"; do   # a container's host name is its short id
  outside="$(grep -v -F " on ${id:0:12} " <<<"$outside" || true)"
done
if [ -n "$outside" ]; then
  echo "error: backup refused: a search runs outside this stack's driver containers ($(paste -sd '#' <<<"$outside" | sed 's/#/; /g')): back up once it has ended" >&2
  exit 2
fi
for id in "${driver_ids[@]}"; do
  docker pause "$id" >/dev/null
  paused+=("$id")
done
started=$SECONDS
# --lock-wait-timeout: a paused driver that holds a table lock (a schema change) fails the dump, never hangs it
docker exec "$(container postgres)" pg_dump -U postgres -d mlflow --format=custom --lock-wait-timeout=20000 >"$work/postgres.dump"
docker exec "$(container ray-head)" lpt-entrypoint tar -C /shared --exclude=./huggingface -cf - . >"$work/shared.tar"
unpause
quiesced=$((SECONDS - started))
docker exec "$(container mlflow)" lpt-entrypoint tar -C /mlartifacts -cf - . >"$work/mlartifacts.tar"
{
  echo "lpt-studies cluster backup, $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "stack: $DIR (compose project $(project))"
  echo "searches running: ${#driver_ids[@]} driver container(s)${driver_ids:+, paused $quiesced s for the dump and the shared volume}"
  echo "postgres: $(docker exec "$(container postgres)" postgres --version)"
  echo "image: $(docker inspect -f '{{.Config.Image}}' "$(container mlflow)"), $(docker exec "$(container mlflow)" lpt-entrypoint mlflow --version)"
} >"$work/backup.txt"
tar -C "$work" -cf "$out.partial" backup.txt postgres.dump mlartifacts.tar shared.tar
sync "$out.partial"
mv "$out.partial" "$out"
removed=0
if [ "$keep" -gt 0 ]; then   # the newest K by name (the names are dated), this one among them
  while read -r old; do
    rm -f -- "$old"
    removed=$((removed + 1))
  done < <(find "$(dirname "$out")" -maxdepth 1 -name 'lpt-backup-*.tar' | sort -r | tail -n +$((keep + 1)))
fi
echo "backup: $out ($(du -h "$out" | cut -f1): database $(du -h "$work/postgres.dump" | cut -f1), artifacts $(du -h "$work/mlartifacts.tar" | cut -f1), searches $(du -h "$work/shared.tar" | cut -f1); ${driver_ids:+${#driver_ids[@]} driver(s) paused $quiesced s; }$removed older backup(s) removed, $keep kept)"
