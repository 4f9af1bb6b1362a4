#!/usr/bin/env bash
# Prints the pip arguments that install torch for this machine (used by `make setup` and `make lock`):
#
#   requirements/torch.sh PIP VERSION [auto|cpu]   e.g. requirements/torch.sh .venv/bin/pip 2.13.0
#
# The build, in order:
#   1. a GPU (nvidia-smi lists one) and mode auto: `torch==VERSION`, PyPI's Linux wheel, a CUDA build;
#   2. otherwise the CPU build `torch==VERSION+cpu`: from pip's configured sources if they hold it
#      (pip.conf / PIP_* with a find-links folder, a mirror or PyTorch's CPU index), checked with a
#      dry run that downloads nothing; else from PyTorch's CPU index. PyPI's own Linux wheel is the
#      CUDA build (several GB with its nvidia-* libraries), which a CPU-only machine never needs.
# Its hashed lock (requirements/torch-cuda.txt, torch-cpu.txt: `make lock-torch`), when there is one,
# is what gets installed: `--require-hashes --no-deps -r LOCK`, so a file whose sha256 is not in the
# lock is refused. A lock for another torch version is an error, not a fallback. Without a lock for
# the build (torch-cpu.txt needs PyTorch's CPU index to be written), the pick above installs unhashed
# and says so. TORCH_LOCKS=0 prints the bare pick (what `make lock` resolves against).
# `make TORCH_SPEC="..."` bypasses this script (another CUDA build: --index-url .../whl/cu126).
set -euo pipefail
pip=${1:?usage: torch.sh PIP VERSION [auto|cpu]}
version=${2:?usage: torch.sh PIP VERSION [auto|cpu]}
mode=${3:-auto}
cpu_index=https://download.pytorch.org/whl/cpu
locks=$(cd "$(dirname "$0")" && pwd)

locked() { # build spec [pip options]: the lock's install arguments, or 1 when there is no lock
  local lock="$locks/torch-$1.txt" spec=$2
  shift 2
  [ "${TORCH_LOCKS:-1}" != 0 ] && [ -e "$lock" ] || return 1
  if ! grep -qxF "$spec \\" "$lock"; then
    echo "torch: $lock does not pin $spec: run make lock-torch (or set TORCH_VERSION to its version)" >&2
    exit 3
  fi
  echo "torch: $spec from the hashed lock $lock" >&2
  echo "--require-hashes --no-deps -r $lock $*"
}
unlocked() {
  [ "${TORCH_LOCKS:-1}" = 0 ] || echo "torch: WARNING no hashed lock requirements/torch-$1.txt: installing without hash checks (make lock-torch writes it)" >&2
}

if [ "$mode" = auto ] && command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q '^GPU'; then
  locked cuda "torch==$version" && exit 0
  unlocked cuda
  echo "torch: GPU found (nvidia-smi), installing PyPI's CUDA build torch==$version" >&2
  echo "torch==$version"
elif "$pip" install --dry-run --quiet --no-deps --ignore-installed "torch==$version+cpu" >/dev/null 2>&1; then
  locked cpu "torch==$version+cpu" && exit 0
  unlocked cpu
  echo "torch: CPU build torch==$version+cpu from pip's configured sources" >&2
  echo "torch==$version+cpu"
else
  locked cpu "torch==$version+cpu" --extra-index-url "$cpu_index" && exit 0
  unlocked cpu
  echo "torch: CPU build torch==$version+cpu from $cpu_index" >&2
  echo "torch==$version+cpu --extra-index-url $cpu_index"
fi
