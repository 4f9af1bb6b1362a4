#!/usr/bin/env bash
# Writes the hashed torch locks (`make lock-torch`), one per build, for Linux x86_64 and the Python
# that runs it (3.11 for the committed locks):
#
#   torch-cuda.txt   torch==VERSION from PyPI (its Linux wheel is the CUDA build) with its nvidia-*,
#                    cuda-* and triton wheels
#   torch-cpu.txt    torch==VERSION+cpu from PyTorch's CPU index (download.pytorch.org/whl/cpu)
#
# Every file's sha256 comes from the index that serves it; both are resolved with requirements/dev.txt
# as constraints, so torch's own dependencies keep dev.txt's versions. pip's own configuration
# (pip.conf, PIP_* sources, local wheel folders) is ignored: a lock must name the index's files, not
# a machine's copies. A lock whose index cannot be reached is left as it was, and the command fails.
#
#   requirements/lock_torch.sh PIP TORCH_VERSION [cuda] [cpu]   (default: both)
set -euo pipefail
pip=${1:?usage: lock_torch.sh PIP TORCH_VERSION [cuda] [cpu]}
version=${2:?usage: lock_torch.sh PIP TORCH_VERSION [cuda] [cpu]}
shift 2
builds=("$@")
[ ${#builds[@]} -gt 0 ] || builds=(cuda cpu)
cd "$(dirname "$0")/.."
bin=$(dirname "$pip")
pypi=https://pypi.org/simple
cpu_index=https://download.pytorch.org/whl/cpu
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
export CUSTOM_COMPILE_COMMAND="make lock-torch"

failed=0
for build in "${builds[@]}"; do
  case $build in
    cuda) spec="torch==$version"; indexes=(--index-url "$pypi") ;;
    cpu) spec="torch==$version+cpu"; indexes=(--index-url "$cpu_index" --extra-index-url "$pypi") ;;
    *) echo "unknown build $build (cuda or cpu)" >&2; exit 2 ;;
  esac
  echo "$spec" >"$work/torch-$build.in"
  if env -u PIP_FIND_LINKS -u PIP_INDEX_URL -u PIP_EXTRA_INDEX_URL -u PIP_CONSTRAINT -u PIP_NO_INDEX \
      PIP_CONFIG_FILE=/dev/null "$bin/pip-compile" --quiet --generate-hashes --strip-extras --allow-unsafe \
      --no-emit-index-url --no-emit-find-links "${indexes[@]}" --constraint requirements/dev.txt \
      --output-file "$work/torch-$build.txt" "$work/torch-$build.in"; then
    sed -e "s#$work/torch-$build.in#requirements/lock_torch.sh ($spec)#" "$work/torch-$build.txt" >"requirements/torch-$build.txt"
    echo "wrote requirements/torch-$build.txt ($spec)"
  else
    echo "requirements/torch-$build.txt NOT written: $spec could not be resolved from ${indexes[*]}" >&2
    failed=1
  fi
done
exit $failed
