#!/bin/sh
# Start one Servable service (front + model worker) from environment settings only.
#   SERVABLE_SERVICE   image | text         which service this container runs
#   SERVABLE_PORT      3000                 listen port (all interfaces inside the container)
#   SERVABLE_MODEL_DIR /models              BentoML model store: baked in, or mounted read-only
#   BENTOML_HOME       /tmp/bentoml         writable BentoML state (metrics multiproc dir, tmp)
# Every other setting is a SERVABLE_* variable (docs/configuration.md); API keys come from the
# file named by SERVABLE_AUTH_KEYS_FILE (a mounted secret), never from the image.
set -eu
case "${SERVABLE_SERVICE:-image}" in
  image) target="serving.image_service:ImageClassifier" ;;
  text | sentiment) target="serving.text_service:SentimentClassifier" ;;
  *) echo "SERVABLE_SERVICE must be image or text, not '${SERVABLE_SERVICE}'" >&2; exit 64 ;;
esac
home="${BENTOML_HOME:-/tmp/bentoml}"
mkdir -p "$home"
if [ ! -e "$home/models" ]; then
  ln -s "${SERVABLE_MODEL_DIR:-/models}" "$home/models"
fi
exec bentoml serve "$target" --host "${SERVABLE_HOST:-0.0.0.0}" --port "${SERVABLE_PORT:-3000}"
