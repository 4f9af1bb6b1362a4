#!/usr/bin/env bash
# Everything a fresh clone needs before `docker compose ... up` (make compose-prep):
#   1. secrets: each deploy/secrets/<name> that does not exist yet is made from <name>.example; the
#      API key and the Grafana password get random values (printed once), the alerting keys are
#      copied as placeholders to replace. Mode 644: compose (outside swarm) bind-mounts a secret
#      with the host file's owner and mode, and the containers run as uid 10001 (replicas),
#      472 (Grafana) and 65534 (Alertmanager).
#   2. a development certificate in SERVABLE_TLS_DIR (default deploy/tls/local) unless one valid
#      for another day is there (deploy/tls/make_self_signed.sh).
#   3. the model store: SERVABLE_MODEL_STORE (default ~/bentoml/models) holds the tags compose will
#      serve (each served model's <env prefix>MODEL_TAG, e.g. SERVABLE_IMAGE_SERVE_MODEL_TAG; default
#      <name>:latest; the list below is generated from SERVED_MODELS),
#      readable by uid 10001.
# Existing files are never overwritten. Exit 0 when compose can start, 1 with the reason when not.
set -euo pipefail
DEPLOY="$(cd "$(dirname "$0")" && pwd)"
SECRETS="$DEPLOY/secrets"
RANDOMISED="api_keys grafana_admin_password"

random_token() { od -An -N24 -tx1 /dev/urandom | tr -d ' \n'; }

for example in "$SECRETS"/*.example; do
  name="$(basename "$example" .example)"
  secret="$SECRETS/$name"
  if [ ! -e "$secret" ]; then
    case " $RANDOMISED " in
      *" $name "*)
        token="$(random_token)"
        if [ "$name" = api_keys ]; then printf 'compose:%s\n' "$token" >"$secret"; else printf '%s\n' "$token" >"$secret"; fi
        echo "wrote $secret (random): $([ "$name" = api_keys ] && echo "API key compose:$token" || echo "$token")"
        ;;
      *)
        cp "$example" "$secret"
        echo "wrote $secret from $name.example: replace the placeholder before alerts can be delivered"
        ;;
    esac
  fi
  chmod 644 "$secret"
done

tls="${SERVABLE_TLS_DIR:-./tls/local}"
case "$tls" in /*) ;; *) tls="$DEPLOY/$tls" ;; esac # relative to deploy/, as compose reads it
if [ -s "$tls/server.crt" ] && [ -s "$tls/server.key" ] && openssl x509 -checkend 86400 -noout -in "$tls/server.crt" >/dev/null; then
  echo "certificate: $tls/server.crt (valid for at least another day)"
else
  "$DEPLOY/tls/make_self_signed.sh" "$tls"
fi

store="${SERVABLE_MODEL_STORE:-$HOME/bentoml/models}"
store="${store/#\~/$HOME}"
problems=0
# >>> generated: model-tags (python -m deploy.render, from SERVED_MODELS: do not edit by hand)
tags=("${SERVABLE_IMAGE_SERVE_MODEL_TAG:-fashion-cnn:latest}" "${SERVABLE_TEXT_SERVE_MODEL_TAG:-sentiment-bert:latest}")
names="fashion-cnn sentiment-bert"
# <<< generated: model-tags
for tag in "${tags[@]}"; do
  name="${tag%%:*}" version="${tag#*:}"
  [ "$version" = latest ] && [ -r "$store/$name/latest" ] && version="$(cat "$store/$name/latest")"
  if [ -f "$store/$name/$version/model.yaml" ]; then
    echo "model: $name:$version in $store"
  else
    echo "model $tag is not in the store $store (make all registers $names; SERVABLE_MODEL_STORE selects another store)" >&2
    problems=1
  fi
done
if [ -d "$store" ] && unreadable="$(find "$store" \( -type d ! -perm -o+rx \) -o \( -type f ! -perm -o+r \) | head -3)" \
  && [ -n "$unreadable" ]; then
  echo "the containers (uid 10001) cannot read the model store: e.g. $unreadable; run: chmod -R o+rX $store" >&2
  problems=1
fi
[ "$problems" = 0 ] && echo "ready: docker compose -f deploy/compose.yaml [-f deploy/compose.cpu.yaml] up -d --build"
exit "$problems"
