#!/usr/bin/env bash
# `pip check` of the virtualenv, except for the bundled assets of requirements/assets.txt: they are
# installed without their dependencies on purpose (docs/assets.md), so once present (a second
# `make setup`, after a lock refresh) pip would report them as broken.
set -uo pipefail
pip=${1:?usage: check.sh PIP}
assets=$(sed -n 's/^\([A-Za-z0-9_.-]*\)==.*/\1/p' "$(dirname "$0")/assets.txt" | paste -sd'|')
bad=$("$pip" check 2>&1 | grep -v -i -E "^(${assets}) |^No broken requirements found")
if [ -n "$bad" ]; then
  printf '%s\n' "$bad" >&2
  exit 1
fi
