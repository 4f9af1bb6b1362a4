#!/usr/bin/env bash
# Build Servable's images with podman where no registry is reachable: each base is a Debian root
# filesystem made from Debian packages (mmdebstrap) and imported, in place of the registry images
# compose names.
#
#   deploy/podman/images.sh [servable] [nginx] [prometheus] [alertmanager]   (default: all four)
#
# One base for all: Debian bookworm with python3 (3.11, as python:3.11-slim-bookworm), from Debian
# packages (mmdebstrap) -> localhost/servable-base:bookworm.
#   servable      deploy/Dockerfile on it -> $SERVABLE_IMAGE (default localhost/servable:cpu)
#   nginx, prometheus, alertmanager
#                 deploy/podman/services.Dockerfile on it, Debian's own packages
#                 -> localhost/servable-<name>:debian (deploy/podman/compose.debian-images.yaml
#                 maps compose's services to them)
#
# Environment: WORK (scratch dir), DEBIAN_MIRROR, SERVABLE_IMAGE, BUILD_LOG_DIR (default WORK).
# Needs root (or rootless podman), podman, runc, mmdebstrap; Debian's mirror and PyPI for the builds.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
export CONTAINERS_CONF="${CONTAINERS_CONF:-$ROOT/deploy/podman/containers.conf}"
WORK="${WORK:-$(mktemp -d /tmp/servable-images.XXXXXX)}"
MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
SERVABLE_IMAGE="${SERVABLE_IMAGE:-localhost/servable:cpu}"
[ $# -gt 0 ] || set -- servable nginx prometheus alertmanager

log() { printf '[%(%H:%M:%S)T] %s\n' -1 "$*"; }

base() { # suite tag packages: a minimal Debian root filesystem, imported once
  local suite=$1 tag=$2 include=$3
  podman image exists "$tag" && return 0
  log "base: Debian $suite root filesystem ($include) -> $tag"
  # The base trusts the host's CA bundle (pip and apt inside a build then work behind a
  # TLS-inspecting proxy); pip is told to use the system bundle rather than certifi's.
  mmdebstrap --variant=minbase --include="$include" --aptopt='Acquire::Retries "3"' \
    --customize-hook='if [ -s /etc/ssl/certs/ca-certificates.crt ]; then cp /etc/ssl/certs/ca-certificates.crt "$1/etc/ssl/certs/ca-certificates.crt"; fi' \
    --customize-hook='printf "[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n" > "$1/etc/pip.conf"' \
    "$suite" "$WORK/rootfs-$suite.tar" "$MIRROR" >"$WORK/mmdebstrap-$suite.log" 2>&1 \
    || { tail -20 "$WORK/mmdebstrap-$suite.log"; exit 1; }
  podman import --change 'CMD ["/bin/bash"]' "$WORK/rootfs-$suite.tar" "$tag" >/dev/null 2>&1
  rm -f "$WORK/rootfs-$suite.tar"
}

build() { # tag logname podman-build-args...
  local tag=$1 name=$2; shift 2
  local t0=$SECONDS
  # --format docker keeps HEALTHCHECK; --network host: pip and apt reach their registries
  podman build --format docker --network host -t "$tag" "$@" >"$WORK/build-$name.log" 2>&1 \
    || { tail -30 "$WORK/build-$name.log"; exit 1; }
  log "built $tag in $((SECONDS - t0)) s: $(podman image inspect "$tag" --format '{{.Size}}') bytes"
}

base bookworm localhost/servable-base:bookworm python3,python3-venv,ca-certificates
for what in "$@"; do
  case "$what" in
    servable)
      build "$SERVABLE_IMAGE" servable -f "$ROOT/deploy/Dockerfile" --build-arg BASE_IMAGE=localhost/servable-base:bookworm \
        --build-arg ORT_PACKAGE=onnxruntime "$ROOT"
      ;;
    nginx | prometheus | alertmanager)
      build "localhost/servable-$what:debian" "$what" -f "$ROOT/deploy/podman/services.Dockerfile" --target "$what" \
        --build-arg BASE_IMAGE=localhost/servable-base:bookworm "$ROOT/deploy/podman"
      ;;
    *) echo "unknown image $what (servable, nginx, prometheus, alertmanager)" >&2; exit 2 ;;
  esac
done
