#!/usr/bin/env bash
# Installs the Debian/Ubuntu packages given as arguments that are missing, without side effects:
#   - no recommended packages (prometheus recommends prometheus-node-exporter, a service on :9100;
#     docker-compose recommends docker.io, the Docker daemon);
#   - no service started or left enabled: the project runs the nginx and Prometheus binaries itself,
#     on 127.0.0.1 from temporary directories; their system services would hold :80, :9090 and :9093
#     (where compose's Prometheus listens). A policy-rc.d that answers 101 stops the packages'
#     scripts from starting them during the install; under systemd they are then disabled, because
#     the scripts enable them for the next boot. Services of packages installed before are left alone.
# As root, or through sudo. `make SKIP_APT=1` skips this where the packages come from elsewhere.
set -euo pipefail
SERVICES=(nginx prometheus prometheus-alertmanager)  # packages whose install would start a listening service

missing=()
for pkg in "$@"; do
  dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
done
[ ${#missing[@]} -eq 0 ] && exit 0

sudo=()
[ "$(id -u)" -eq 0 ] || sudo=(sudo)
policy=/usr/sbin/policy-rc.d
if [ ! -e "$policy" ]; then
  printf '#!/bin/sh\nexit 101\n' | "${sudo[@]}" tee "$policy" >/dev/null
  "${sudo[@]}" chmod 755 "$policy"
  trap '"${sudo[@]}" rm -f "$policy"' EXIT
fi

echo "apt: installing ${missing[*]}" >&2
"${sudo[@]}" apt-get update -qq
"${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"

if [ -d /run/systemd/system ]; then
  for svc in "${SERVICES[@]}"; do
    if printf '%s\n' "${missing[@]}" | grep -qx "$svc"; then
      "${sudo[@]}" systemctl disable --now "$svc.service" >/dev/null 2>&1 || true
    fi
  done
fi
