#!/usr/bin/env bash
# Build the CPU image from deploy/Dockerfile with podman where no registry is reachable, run it on
# 127.0.0.1 and call both endpoints. The base image is a Debian bookworm root filesystem built
# from Debian packages (mmdebstrap) and imported, instead of python:3.11-slim from a registry
# (deploy/podman/images.sh builds both).
#
#   deploy/podman/build_and_run.sh            (or: make image-cpu-podman)
#
# Environment: MODEL_STORE (a BentoML model store's models/ dir, default ~/bentoml/models),
# IMAGE_TAG / TEXT_TAG (default fashion-cnn:latest / sentiment-bert:latest), WORK (scratch dir),
# KEEP_IMAGE=1 keeps the built images. Needs root (or rootless podman), podman, runc, iptables, mmdebstrap.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
export CONTAINERS_CONF="${CONTAINERS_CONF:-$ROOT/deploy/podman/containers.conf}"
MODEL_STORE="${MODEL_STORE:-${BENTOML_HOME:-$HOME/bentoml}/models}"
IMAGE_TAG="${IMAGE_TAG:-fashion-cnn:latest}"
TEXT_TAG="${TEXT_TAG:-sentiment-bert:latest}"
WORK="${WORK:-$(mktemp -d /tmp/servable-podman.XXXXXX)}"
BASE=localhost/servable-base:bookworm
IMAGE=localhost/servable:cpu
KEY="podman-$(head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n')"
started=()

log() { printf '[%(%H:%M:%S)T] %s\n' -1 "$*"; }
cleanup() {
  for c in "${started[@]}"; do podman rm -f -t 10 "$c" >/dev/null 2>&1 || true; done
  if [ -z "${KEEP_IMAGE:-}" ]; then podman rmi -f "$IMAGE" "$BASE" >/dev/null 2>&1 || true; fi
}
trap cleanup EXIT
[ -d "$MODEL_STORE" ] || { echo "no model store at $MODEL_STORE (run make all, or set MODEL_STORE)" >&2; exit 2; }

t0=$SECONDS
# the bookworm base from Debian packages, then deploy/Dockerfile on it (deploy/podman/images.sh)
WORK="$WORK" SERVABLE_IMAGE="$IMAGE" "$ROOT/deploy/podman/images.sh" servable
log "image built ($((SECONDS - t0)) s): $(podman image inspect "$IMAGE" --format '{{.Size}}') bytes"
podman image inspect "$IMAGE" --format 'user={{.Config.User}} healthcheck={{.Config.Healthcheck.Test}}'

# The key file in a directory mounted read-only, as compose mounts deploy/secrets/api/ (a replaced
# file is seen inside), mode 0440 for the image's group 10001. Rootless podman maps host ids into a
# user namespace where that group is not the host's 10001: there the file is world-readable instead
# (a throwaway key in a private scratch directory).
mkdir -p "$WORK/secrets"
printf 'podman:%s\n' "$KEY" >"$WORK/secrets/api_keys"
if [ "$(id -u)" = 0 ]; then
  chgrp 10001 "$WORK/secrets" "$WORK/secrets/api_keys"
  chmod 0750 "$WORK/secrets" && chmod 0440 "$WORK/secrets/api_keys"
else
  chmod 0755 "$WORK/secrets" && chmod 0444 "$WORK/secrets/api_keys"
fi
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
run() { # name service port env...
  local name=$1 service=$2 port=$3; shift 3
  # --no-healthcheck: podman schedules HEALTHCHECK with systemd timers, absent here; the same
  # command is run by hand below.
  podman run -d --name "$name" --no-healthcheck --read-only --tmpfs /tmp:rw,size=512m,mode=1777 \
    --security-opt no-new-privileges --cap-drop ALL \
    -p "127.0.0.1:$port:3000" -v "$MODEL_STORE:/models:ro" -v "$WORK/secrets:/run/secrets/servable:ro" \
    -e SERVABLE_AUTH_KEYS_FILE=/run/secrets/servable/api_keys -e "SERVABLE_SERVICE=$service" "$@" "$IMAGE" >/dev/null
  started+=("$name")
}
wait_ready() { # name port
  for _ in $(seq 1 120); do
    if curl -fsS -m 3 "http://127.0.0.1:$2/readyz" >/dev/null 2>&1; then return 0; fi
    if [ "$(podman inspect -f '{{.State.Running}}' "$1")" != true ]; then break; fi
    sleep 2
  done
  podman logs "$1" 2>&1 | tail -30; echo "$1 did not become ready" >&2; return 1
}
ip=$(free_port); tp=$(free_port)
run "servable-image-$ip" image "$ip" -e "SERVABLE_IMAGE_SERVE_MODEL_TAG=$IMAGE_TAG"
run "servable-text-$tp" text "$tp" -e "SERVABLE_TEXT_SERVE_MODEL_TAG=$TEXT_TAG"
wait_ready "servable-image-$ip" "$ip"
wait_ready "servable-text-$tp" "$tp"
log "both containers ready ($((SECONDS - t0)) s)"
podman exec "servable-image-$ip" python3 /usr/local/bin/servable-healthcheck && log "HEALTHCHECK command: healthy"
podman exec "servable-image-$ip" id
# No pip in the final image: neither the venv's Python nor the base's system Python can import it.
podman exec "servable-image-$ip" sh -c 'for py in python3 /usr/local/bin/python3 /usr/bin/python3; do
  [ -x "$(command -v "$py")" ] || continue; if "$py" -c "import pip" 2>/dev/null; then echo "$py has pip"; exit 1; fi; done' \
  || { echo "pip is importable in the final image" >&2; exit 1; }
log "no pip in the final image"

png="$WORK/probe.png"
python3 - "$png" <<'PY'
import struct, sys, zlib
w = h = 28
raw = b"".join(b"\x00" + bytes((x * 9) % 256 for x in range(w)) for _ in range(h))
chunk = lambda t, d: struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)
open(sys.argv[1], "wb").write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
                               + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))
PY
log "POST /classify"
curl -fsS -m 30 -H "x-api-key: $KEY" -F "image=@$png" "http://127.0.0.1:$ip/classify"; echo
log "POST /sentiment"
curl -fsS -m 30 -H "x-api-key: $KEY" -H 'content-type: application/json' \
  -d '{"texts": ["A gorgeous, witty film.", "Dull and far too long."]}' "http://127.0.0.1:$tp/sentiment"; echo
code=$(curl -s -o /dev/null -w '%{http_code}' -m 10 -X POST -H 'content-type: application/json' -d '{"text":"x"}' \
  "http://127.0.0.1:$tp/sentiment")
[ "$code" = 401 ] || { echo "expected 401 without a key, got $code" >&2; exit 1; }
log "GET /info (provider in use)"
curl -fsS -m 30 -H "x-api-key: $KEY" "http://127.0.0.1:$ip/info" | python3 -c 'import json,sys; d=json.load(sys.stdin); print(d["model_tag"], d["provider"])'
log "OK: CPU image built from deploy/Dockerfile and served both endpoints in $((SECONDS - t0)) s"
