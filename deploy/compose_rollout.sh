#!/usr/bin/env bash
# Roll the replicas of one service to the model tag compose now reads, one replica at a time
# (make compose-rollout KIND=text). For each replica <kind>-N: recreate it, wait until its
# HEALTHCHECK (/readyz: model verified by checksum and warmed up) says healthy, reload nginx
# (it resolves replica names at start and must learn the new container's address), then the next.
# While one replica restarts, nginx sends its requests to the others (proxy_next_upstream).
# A replica that does not become healthy stops the roll: the ones not yet rolled keep serving the
# previous tag; set the previous tag again and run this once more to roll back.
#
#   SERVABLE_TEXT_SERVE_MODEL_TAG=sentiment-bert:v20261201-090000 deploy/compose_rollout.sh text
#
# Environment: COMPOSE (default "docker compose"; "docker-compose" for v1), COMPOSE_FILES (default
# "-f deploy/compose.yaml"; add "-f deploy/compose.gpu.yaml" on GPU hosts), ENGINE (docker|podman,
# for `inspect`), ROLLOUT_TIMEOUT_S (per replica, default 300).
set -euo pipefail
kind="${1:?usage: $0 image|text}"
cd "$(dirname "$0")/.."
read -r -a compose <<<"${COMPOSE:-docker compose}"
read -r -a files <<<"${COMPOSE_FILES:--f deploy/compose.yaml}"
engine="${ENGINE:-docker}"
timeout_s="${ROLLOUT_TIMEOUT_S:-300}"
dc() { "${compose[@]}" "${files[@]}" "$@"; }

mapfile -t replicas < <(dc config --services | grep -E "^${kind}-[0-9]+$" | sort -V)
[ "${#replicas[@]}" -gt 0 ] || { echo "no replicas named ${kind}-N in ${files[*]}" >&2; exit 2; }
prefix="SERVABLE_$(tr '[:lower:]' '[:upper:]' <<<"$kind")_SERVE_"
echo "rolling ${replicas[*]} to ${prefix}MODEL_TAG=$(dc config | sed -n "s/^ *${prefix}MODEL_TAG: *//p" | head -1)"

for replica in "${replicas[@]}"; do
  echo "$replica: recreating"
  dc up -d --no-deps --force-recreate "$replica"
  id="$(dc ps -q "$replica")"
  status=starting
  for _ in $(seq 1 "$((timeout_s / 5))"); do
    status="$("$engine" inspect -f '{{.State.Health.Status}}' "$id")"
    [ "$status" = healthy ] || [ "$status" = unhealthy ] && break
    sleep 5
  done
  if [ "$status" != healthy ]; then
    dc logs --tail 30 "$replica" >&2 || true
    echo "$replica is $status after ${timeout_s}s: roll stopped; the other replicas keep the previous tag" >&2
    exit 1
  fi
  dc exec -T nginx sh -c 'nginx -t && nginx -s reload'
  echo "$replica: healthy, nginx reloaded"
done
echo "rolled: ${replicas[*]}"
