#!/bin/sh
# Start one Servable service (front + model worker) from environment settings only.
#   SERVABLE_SERVICE   image | text | ...   which served model this container runs: a kind of
#                                           SERVED_MODELS (servable/config.py), or its docs name
#   SERVABLE_PORT      3000                 listen port (all interfaces inside the container)
#   SERVABLE_MODEL_DIR /models              BentoML model store: baked in, or mounted read-only
#   BENTOML_HOME       /tmp/bentoml         writable BentoML state (metrics multiproc dir, tmp)
# Every other setting is a SERVABLE_* variable (docs/configuration.md); API keys come from the
# file named by SERVABLE_AUTH_KEYS_FILE (a mounted secret), never from the image.
set -eu
# The `bentoml serve` target comes from SERVED_MODELS: a new model needs no branch here.
target="$(python - "${SERVABLE_SERVICE:-image}" <<'PY'
import sys

from servable.config import SERVED_MODELS

want = sys.argv[1]
found = [e.service for e in SERVED_MODELS.values() if want in (e.kind, e.docs_name)]
if not found:
    sys.exit(f"SERVABLE_SERVICE must be one of {', '.join(SERVED_MODELS)}, not {want!r}")
print(found[0])
PY
)" || exit 64
home="${BENTOML_HOME:-/tmp/bentoml}"
mkdir -p "$home"
if [ ! -e "$home/models" ]; then
  ln -s "${SERVABLE_MODEL_DIR:-/models}" "$home/models"
fi
exec bentoml serve "$target" --host "${SERVABLE_HOST:-0.0.0.0}" --port "${SERVABLE_PORT:-3000}"
