#!/bin/sh
# Grafana's entrypoint in compose: anonymous (Viewer) access only while Grafana is published on a
# loopback address, then the image's own /run.sh. Once SERVABLE_MONITOR_BIND opens it to a network,
# dashboards need the admin login (or users you create), unless SERVABLE_GRAFANA_ANONYMOUS=true.
#   SERVABLE_GRAFANA_ANONYMOUS: auto (default) | true | false
#   SERVABLE_MONITOR_BIND: the host address compose publishes Grafana on (default 127.0.0.1)
set -eu
bind="${SERVABLE_MONITOR_BIND:-127.0.0.1}"
case "${SERVABLE_GRAFANA_ANONYMOUS:-auto}" in
  true | false) anonymous="$SERVABLE_GRAFANA_ANONYMOUS" ;;
  auto)
    case "$bind" in
      127.* | localhost | ::1 | "[::1]") anonymous=true ;;
      *) anonymous=false ;;
    esac
    ;;
  *)
    echo "SERVABLE_GRAFANA_ANONYMOUS must be auto, true or false, not '$SERVABLE_GRAFANA_ANONYMOUS'" >&2
    exit 2
    ;;
esac
export GF_AUTH_ANONYMOUS_ENABLED="$anonymous"
echo "grafana: anonymous viewer access $([ "$anonymous" = true ] && echo on || echo off) (bind $bind)"
exec "${GRAFANA_RUN:-/run.sh}" "$@"
