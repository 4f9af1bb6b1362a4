#!/usr/bin/env bash
# Prints the pip arguments that install torch for this machine (used by `make setup` and `make lock`):
#
#   requirements/torch.sh PIP VERSION [auto|cpu]   e.g. requirements/torch.sh .venv/bin/pip 2.13.0
#
# The rule, in order:
#   1. a GPU (nvidia-smi lists one) and mode auto: `torch==VERSION`, PyPI's Linux wheel, a CUDA build;
#   2. otherwise the CPU build `torch==VERSION+cpu`: from pip's configured sources if they hold it
#      (pip.conf / PIP_* with a find-links folder, a mirror or PyTorch's CPU index), checked with a
#      dry run that downloads nothing; else from PyTorch's CPU index. PyPI's own Linux wheel is the
#      CUDA build (several GB with its nvidia-* libraries), which a CPU-only machine never needs.
# `make TORCH_SPEC="..."` bypasses this script (another CUDA build: --index-url .../whl/cu126).
set -euo pipefail
pip=${1:?usage: torch.sh PIP VERSION [auto|cpu]}
version=${2:?usage: torch.sh PIP VERSION [auto|cpu]}
mode=${3:-auto}
cpu_index=https://download.pytorch.org/whl/cpu

if [ "$mode" = auto ] && command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q '^GPU'; then
  echo "torch: GPU found (nvidia-smi), installing PyPI's CUDA build torch==$version" >&2
  echo "torch==$version"
elif "$pip" install --dry-run --quiet --no-deps --ignore-installed "torch==$version+cpu" >/dev/null 2>&1; then
  echo "torch: CPU build torch==$version+cpu from pip's configured sources" >&2
  echo "torch==$version+cpu"
else
  echo "torch: CPU build torch==$version+cpu from $cpu_index" >&2
  echo "torch==$version+cpu --extra-index-url $cpu_index"
fi
