#!/usr/bin/env bash
# Everything a fresh clone needs before `docker compose ... up` (make compose-prep):
#   1. secrets: each secret that does not exist yet is made from deploy/secrets/<name>.example; the
#      API key and the Grafana password get random values (printed once), the alerting keys are
#      copied as placeholders to replace. The API keys go to deploy/secrets/api/api_keys: compose
#      mounts that directory into the replicas (a replaced key file is seen there; see compose.yaml).
#      Every secret is mode 0440 and the api/ directory 0750, group SERVABLE_SECRETS_GID: compose
#      bind-mounts them with the host's owner, group and mode, and each container that reads one
#      (replicas uid 10001, Grafana 472, Alertmanager 65534) joins that group (group_add), so no
#      other user of the host or of a container can read them. Run as root, the group is 10001 (the
#      image's `servable` group, compose's default); else it is your own group, and its id is written
#      to deploy/.env (compose reads that file for the same variable).
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
if [ "$(id -u)" = 0 ]; then gid="${SERVABLE_SECRETS_GID:-10001}"; else gid="${SERVABLE_SECRETS_GID:-$(id -g)}"; fi

random_token() { od -An -N24 -tx1 /dev/urandom | tr -d ' \n'; }
secret_path() { if [ "$1" = api_keys ]; then echo "$SECRETS/api/api_keys"; else echo "$SECRETS/$1"; fi; }

mkdir -p "$SECRETS/api"
if [ -e "$SECRETS/api_keys" ] && [ ! -e "$SECRETS/api/api_keys" ]; then # the layout before the api/ directory
  mv "$SECRETS/api_keys" "$SECRETS/api/api_keys"
  echo "moved $SECRETS/api_keys to $SECRETS/api/api_keys (compose now mounts that directory)"
fi
umask_before="$(umask)"
umask 077 # a new secret is never readable by others, not even for a moment
for example in "$SECRETS"/*.example; do
  name="$(basename "$example" .example)"
  secret="$(secret_path "$name")"
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
  chgrp "$gid" "$secret" || { echo "cannot give $secret the group $gid (SERVABLE_SECRETS_GID): run as root, or as a member of that group" >&2; exit 1; }
  chmod 0440 "$secret"
done
chgrp "$gid" "$SECRETS/api" && chmod 0750 "$SECRETS/api"
echo "secrets: mode 0440, group $gid (the containers join it: SERVABLE_SECRETS_GID)"
# compose's default group is 10001; another one goes to the .env file compose reads beside compose.yaml
env_file="$DEPLOY/.env"
if [ -f "$env_file" ] && grep -q '^SERVABLE_SECRETS_GID=' "$env_file"; then
  sed -i "s/^SERVABLE_SECRETS_GID=.*/SERVABLE_SECRETS_GID=$gid/" "$env_file"
  echo "SERVABLE_SECRETS_GID=$gid in $env_file"
elif [ "$gid" != 10001 ]; then
  printf 'SERVABLE_SECRETS_GID=%s\n' "$gid" >>"$env_file"
  echo "wrote SERVABLE_SECRETS_GID=$gid to $env_file"
fi
umask "$umask_before"

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
[ "$problems" = 0 ] && echo "ready: docker compose -f deploy/compose.yaml [-f deploy/compose.gpu.yaml] up -d --build"
exit "$problems"
