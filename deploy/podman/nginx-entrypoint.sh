#!/bin/sh
# What the official nginx image's entrypoint does that compose relies on: every
# /etc/nginx/templates/<name>.template is written to /etc/nginx/conf.d/<name> with the variables
# that are set filled in (envsubst limited to them, so nginx's own $variables stay), then nginx runs.
set -eu
defined="$(env | sed -n 's/^\([A-Za-z_][A-Za-z0-9_]*\)=.*/${\1}/p' | tr '\n' ' ')"
for template in /etc/nginx/templates/*.template; do
  [ -e "$template" ] || continue
  out="/etc/nginx/conf.d/$(basename "$template" .template)"
  envsubst "$defined" <"$template" >"$out"
  echo "nginx-entrypoint: $template -> $out" >&2
done
exec "$@"
